"""Loading MACE checkpoints (paths or foundation names) and describing their latent layout.

The latent of an atom is the 0e (scalar) part of the node features after every interaction
block, concatenated, followed by the per-readout energy contributions after scaling (eV).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import warnings
from pathlib import Path

import numpy as np

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io.provenance import sha256_file

MACE_OFF_NAMES = ("small_off", "medium_off", "large_off")
PRETRAINING_HEAD = "pt_head"  # the replay head of MACE's multihead fine-tuning


def exception_line(exc: BaseException) -> str:
    """``<type>: <message>`` of an exception on one line (runs of whitespace, newlines included, become one space)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def foundation_names() -> list[str]:
    """Return the foundation model names that mace-torch can download (MACE-MP family and MACE-OFF23)."""
    from mace.calculators.foundations_models import mace_mp_urls

    return sorted(mace_mp_urls) + list(MACE_OFF_NAMES)


def resolve_model_path(model: str) -> Path:
    """Return the checkpoint file for a path or a MACE foundation name, using mace's cache/download.

    Foundation names resolve through mace-torch's own code into ``~/.cache/mace`` (honouring
    XDG_CACHE_HOME); a name whose file is cached needs no network.
    """
    path = Path(model)
    if path.exists():
        if not path.is_file():
            raise ProtoalignError(f"model {model} is not a file")
        return path
    if path.suffix or len(path.parts) > 1:  # a path, not a name: no need to import mace to say so
        raise ProtoalignError(f"model file {model} does not exist")
    if model not in foundation_names():
        raise ProtoalignError(
            f"model {model!r} is neither an existing file nor a MACE foundation name "
            f"({', '.join(foundation_names())})"
        )
    try:
        return _download_foundation(model)
    except Exception as exc:  # network errors come in many types
        raise ProtoalignError(
            f"could not obtain foundation model {model!r} ({exception_line(exc)}); "
            "without network, download it elsewhere and pass its path"
        ) from exc


def _download_foundation(name: str) -> Path:
    """Locate (or download) a foundation checkpoint with mace-torch's own code; its messages go to stderr."""
    import_mace_quietly()
    from mace.calculators import foundations_models as fm
    from mace.tools.utils import get_cache_dir

    with contextlib.redirect_stdout(sys.stderr):
        if name in MACE_OFF_NAMES:
            size = name.split("_")[0]
            cached = Path(get_cache_dir()) / Path(fm.mace_off_urls[size]).name.split("?")[0]
            if not cached.is_file():
                fm.mace_off(model=size, return_raw_model=True, device="cpu")
            return cached
        return Path(fm.download_mace_mp_checkpoint(name))


def import_mace_quietly() -> None:
    """Import mace (before e3nn) without its import-time chatter.

    mace prints a cuequivariance notice on stdout and e3nn warns about torch.load; both would
    pollute a command's output (stdout is meant for results, stderr for one-line errors).
    """
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mace.modules  # noqa: F401  (must precede e3nn)
        import e3nn.o3  # noqa: F401


@contextlib.contextmanager
def default_dtype(dtype: str):
    """torch's default dtype set to ``dtype`` ('float32' or 'float64') inside the block, and restored after it
    even on an exception or Ctrl-C (mace's own ``torch_tools.default_dtype`` restores it on success only)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def read_checkpoint(path: Path, device: str = "cpu"):
    """A MACE checkpoint as saved (its own dtype, training mode): checked to be a MACE model."""
    import_mace_quietly()
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ProtoalignError("--device cuda was asked for but CUDA is not available")
    try:
        model = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:
        raise ProtoalignError(f"cannot load MACE checkpoint {path}: {exception_line(exc)}") from exc
    missing = [name for name in ("interactions", "products", "readouts", "atomic_energies_fn") if not hasattr(model, name)]
    if not isinstance(model, torch.nn.Module) or missing:
        raise ProtoalignError(f"{path} is not a MACE model checkpoint (it holds a {type(model).__name__})")
    return model


def for_inference(model, device: str = "cpu", dtype: str = "float64"):
    """``model`` in eval mode, without parameter gradients, in the given dtype and device (in place)."""
    import torch

    model = model.to(device=device, dtype=getattr(torch, dtype))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def load_model(path: Path, device: str = "cpu", dtype: str = "float64"):
    """Load a MACE checkpoint for inference: eval mode, no parameter gradients, given dtype/device."""
    return for_inference(read_checkpoint(path, device), device, dtype)


@dataclasses.dataclass(frozen=True)
class LatentBlock:
    """A contiguous block of latent columns: ``kind`` is 'interaction' or 'energy'."""

    name: str
    kind: str
    start: int
    size: int


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the later stages need to know about a checkpoint (energies in eV, lengths in Å)."""

    sha256: str
    model_type: str
    r_max: float
    atomic_numbers: tuple[int, ...]
    heads: tuple[str, ...]
    e0s: np.ndarray  # [n_heads, n_elements], eV, columns in atomic_numbers order
    layout: tuple[LatentBlock, ...]
    has_pair_repulsion: bool
    scales: tuple[float, ...]  # per head: energy columns are already multiplied by it
    shifts: tuple[float, ...]  # per head, eV: node_energy = E0 + sum(energy columns) + shift

    @property
    def latent_dim(self) -> int:
        """Total number of latent columns."""
        return sum(block.size for block in self.layout)

    def e0_by_head(self) -> dict[str, dict[int, float]]:
        """Return E0 (eV) as {head: {Z: E0}}."""
        return {
            head: {int(z): float(self.e0s[h, j]) for j, z in enumerate(self.atomic_numbers)}
            for h, head in enumerate(self.heads)
        }

    def scale_by_head(self) -> dict[str, float]:
        """Return the per-head scale of the interaction energy ({head: scale}; 1 for plain MACE)."""
        return dict(zip(self.heads, self.scales))

    def shift_by_head(self) -> dict[str, float]:
        """Return the per-head shift (eV) added to every atom's energy ({head: shift}; 0 for plain MACE)."""
        return dict(zip(self.heads, self.shifts))


def model_heads(model) -> tuple[str, ...]:
    """Return the model's head names (old single-head checkpoints have none: 'Default')."""
    return tuple(getattr(model, "heads", None) or ["Default"])


def scalar_slices(model) -> list[list[tuple[int, int]]]:
    """For each interaction block, the (start, stop) column ranges of its 0e features in ``node_feats``.

    Offsets are absolute in the concatenated ``node_feats`` output of the model.
    """
    from e3nn import o3

    slices, offset = [], 0
    for product in model.products:
        irreps = o3.Irreps(str(product.linear.irreps_out))
        layer = []
        for (mul, ir), block in zip(irreps, irreps.slices()):
            if ir == o3.Irrep("0e"):
                layer.append((offset + block.start, offset + block.stop))
        slices.append(layer)
        offset += irreps.dim
    return slices


def describe_model(model, path: Path) -> ModelInfo:
    """Describe a loaded MACE model: hash of its file, type, r_max, E0s, heads and latent layout."""
    layout, start = [], 0
    for i, layer in enumerate(scalar_slices(model)):
        size = sum(stop - begin for begin, stop in layer)
        layout.append(LatentBlock(f"interaction_{i}", "interaction", start, size))
        start += size
    has_pair = has_pair_repulsion(model)
    if has_pair:
        layout.append(LatentBlock("pair_repulsion", "energy", start, 1))
        start += 1
    for k in range(len(model.readouts)):
        layout.append(LatentBlock(f"readout_{k}", "energy", start, 1))
        start += 1
    e0s = model.atomic_energies_fn.atomic_energies.detach().cpu().double().numpy()
    heads = model_heads(model)
    e0s = np.atleast_2d(e0s).reshape(len(heads), -1)
    scales, shifts = _per_head_scale_shift(model, len(heads))
    return ModelInfo(
        sha256=sha256_file(path),
        model_type=type(model).__name__,
        r_max=float(model.r_max),
        atomic_numbers=tuple(int(z) for z in model.atomic_numbers),
        heads=heads,
        e0s=e0s,
        layout=tuple(layout),
        has_pair_repulsion=has_pair,
        scales=scales,
        shifts=shifts,
    )


def _per_head_scale_shift(model, n_heads: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    block = getattr(model, "scale_shift", None)
    if block is None:
        return (1.0,) * n_heads, (0.0,) * n_heads

    def per_head(values) -> tuple[float, ...]:
        flat = values.detach().cpu().double().reshape(-1).numpy()
        return tuple(float(v) for v in np.broadcast_to(flat, (n_heads,)))

    return per_head(block.scale), per_head(block.shift)


def has_pair_repulsion(model) -> bool:
    """Whether the model adds a ZBL pair repulsion energy per atom (MACE's own test for it)."""
    return hasattr(model, "pair_repulsion")


def scale_and_shift(model, node_heads):
    """Per-atom (scale, shift) of a ScaleShiftMACE for the given per-atom head indices; (1, 0) for MACE."""
    import torch

    block = getattr(model, "scale_shift", None)
    if block is None:
        ones = torch.ones(node_heads.shape[0], dtype=torch.get_default_dtype(), device=node_heads.device)
        return ones, torch.zeros_like(ones)
    scale = torch.atleast_1d(block.scale)[node_heads]
    shift = torch.atleast_1d(block.shift)[node_heads]
    return scale, shift
