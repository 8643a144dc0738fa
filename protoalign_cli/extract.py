"""Stage 1: per-atom latents of a MACE model over a set of structures, streamed into HDF5.

Per atom we record the 0e node features after every interaction block (concatenated), then the
energy contributions after scaling (eV): ``scale * pair`` (models with pair repulsion) and
``scale * readout_k`` for every readout k, so that

    node_energy = E0 + sum(energy columns) + shift          (ScaleShiftMACE; plain MACE: scale 1, shift 0)
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from protoalign_cli import __version__
from protoalign_cli.io import schema
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.mace.latents import ReadoutCapture, rows_for_atoms
from protoalign_cli.mace.models import (
    ModelInfo,
    default_dtype,
    describe_model,
    import_mace_quietly,
    load_model,
    resolve_model_path,
    scalar_slices,
)
from protoalign_cli.io.outputs import check_writable, partial_path
from protoalign_cli.io.provenance import command_line, package_version, run_summary, write_summary
from protoalign_cli.io.structures import iter_selected, scan_structures, selected_indices
from protoalign_cli.progress import progress


@dataclass
class ExtractRequest:
    """Everything ``protoalign extract`` was asked to do."""

    model: str
    configs: Sequence[Path]
    out: Path
    device: str = "cpu"
    dtype: str = "float64"
    batch_size: int = 32
    head: str | None = None
    max_configs: int | None = None
    shard: tuple[int, int] = (0, 1)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True  # on stderr: a bar on a terminal, a line every few seconds in a log (protoalign_cli.progress)


def summary_path(out: Path) -> Path:
    """Return where the JSON run summary of an output file goes (``NAME.json`` beside ``NAME``)."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def check_request(request: ExtractRequest) -> list[Path]:
    """Raise ProtoalignError for whatever is wrong without looking at the model; return the structure files.

    Cheap on purpose: it runs before torch and mace are imported, so a typo fails in a second.
    """
    if request.batch_size < 1:
        raise ProtoalignError("--batch-size must be >= 1")
    if request.max_configs is not None and request.max_configs < 1:
        raise ProtoalignError("--max-configs must be >= 1")
    out = Path(request.out)
    check_writable(out, request.overwrite, file=True)
    tmp = partial_path(out)
    if tmp.exists() and not (request.resume or request.overwrite):
        raise ProtoalignError(f"an interrupted run left {tmp}; pass --resume to continue it or --overwrite to start over")
    configs = [Path(p) for p in request.configs]
    if not configs:
        raise ProtoalignError("give at least one --configs file")
    resolved = [p.resolve() for p in configs]
    if len(set(resolved)) < len(resolved):
        raise ProtoalignError("the same --configs file is given more than once")
    for path in configs:
        if not path.is_file():
            raise ProtoalignError(f"structure file {path} does not exist")
    return configs


@dataclass
class _Plan:
    """The loaded model and what it will be run on."""

    model: object
    model_path: Path
    info: ModelInfo
    head: str
    counts: list[int]
    selection: list[int]
    header: schema.LatentHeader


def _plan(request: ExtractRequest, configs: list[Path]) -> _Plan:
    """Load the model, check the head and every input structure against it, and choose the configurations."""
    model_path = resolve_model_path(request.model)
    model = load_model(model_path, request.device, request.dtype)
    info = describe_model(model, model_path)
    head = request.head or info.heads[0]
    if head not in info.heads:
        raise ProtoalignError(f"--head {head!r} is not one of the model's heads: {', '.join(info.heads)}")
    counts = count_inputs(configs, set(info.atomic_numbers), request.max_configs)
    selection = selected_indices(sum(counts), request.shard, request.max_configs)
    if not selection:
        raise ProtoalignError(f"shard {request.shard[0]}/{request.shard[1]} selects no configuration (only {sum(counts)} given)")
    header = schema.LatentHeader(
        model_sha256=info.sha256, model_path=str(model_path), mace_version=package_version("mace-torch"),
        model_type=info.model_type, r_max=info.r_max,
        e0s={h: {str(z): e for z, e in d.items()} for h, d in info.e0_by_head().items()},
        heads=list(info.heads), head=head, layout=[vars(b) for b in info.layout],
        source_files=[str(p.resolve()) for p in configs], dtype=request.dtype, command_line=command_line(),
        protoalign_version=__version__, shard=f"{request.shard[0]}/{request.shard[1]}", n_configs_selected=len(selection),
        atomic_inter_scale=info.scale_by_head(), atomic_inter_shift=info.shift_by_head(),
    )
    return _Plan(model, model_path, info, head, counts, selection, header)


def run_extract(request: ExtractRequest) -> dict:
    """Extract latents for the selected configurations into ``request.out`` (HDF5); return a summary.

    The file is written under a temporary name (``.NAME.partial``) and renamed when complete; an
    interrupted run (Ctrl-C, SIGTERM from a batch scheduler) keeps it and raises KeyboardInterrupt
    (its message says so), and ``resume`` continues it from the last complete batch. Any other
    failure removes it. A JSON run summary is written beside the output (``summary_path``).
    """
    configs = check_request(request)
    import_mace_quietly()
    plan = _plan(request, configs)
    out = Path(request.out)
    tmp = partial_path(out)
    resuming = request.resume and tmp.exists()
    if resuming:
        _check_resumable(tmp, plan.header)
    elif tmp.exists():
        tmp.unlink()
    capture = ReadoutCapture(plan.model)
    try:
        with _sigterm_as_interrupt():
            n_atoms, configs_before = _write_latents(request, plan, configs, capture, tmp, resuming)
    except KeyboardInterrupt:
        if not tmp.exists():
            raise
        raise KeyboardInterrupt(f"{tmp} kept, rerun with --resume to continue") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        capture.remove()
    os.replace(tmp, out)
    result = {"out": str(out), "n_configs": len(plan.selection), "n_atoms": n_atoms, "model_sha256": plan.info.sha256,
              "head": plan.head, "resumed_after_configs": configs_before}
    inputs = {"model": str(plan.model_path), "configs": plan.header.source_files, "head": plan.head,
              "device": request.device, "dtype": request.dtype, "batch_size": request.batch_size,
              "max_configs": request.max_configs, "shard": plan.header.shard, "resume": request.resume}
    write_summary(summary_path(out), run_summary("extract", inputs, result))
    return result


def _write_latents(request: ExtractRequest, plan: _Plan, configs: list[Path], capture: ReadoutCapture, tmp: Path,
                   resuming: bool) -> tuple[int, int]:
    """Run the model over the configurations not yet in ``tmp`` and append their rows; (atoms in all, configs before)."""
    import h5py
    import torch
    from mace.tools import torch_geometric

    slices = scalar_slices(plan.model)
    with h5py.File(tmp, "a" if resuming else "w") as handle:
        writer = schema.LatentWriter(handle, plan.header, plan.info.latent_dim, request.dtype)
        writer.truncate_to_progress()
        configs_before = writer.configs_done
        buffer = RowBuffer(writer)
        with default_dtype(request.dtype), torch.no_grad(), progress(
            total=len(plan.selection), desc="extract", unit="config", initial=configs_before, enabled=request.progress
        ) as bar:
            try:
                for pending in _batches(iter_selected(configs, plan.counts, plan.selection[configs_before:]),
                                        request.batch_size):
                    _write_batch(plan.model, capture, slices, plan.info, plan.head, pending, buffer, request.device,
                                 torch_geometric)
                    bar.update(len(pending))
            except KeyboardInterrupt:
                buffer.flush()  # keep the batches already computed
                raise
        buffer.flush()
        writer.finish()
        return writer.n_rows, configs_before


def _batches(items: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    pending: list = []
    for item in items:
        pending.append(item)
        if len(pending) == size:
            yield pending
            pending = []
    if pending:
        yield pending


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM (what SLURM sends at a time limit) into KeyboardInterrupt while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block is done, then deliver them to the handlers in force before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, _frame: received.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def _check_resumable(tmp: Path, header: schema.LatentHeader) -> None:
    """Refuse (keeping the partial file) to resume a partial file written with other settings or unreadable."""
    import h5py

    try:
        with h5py.File(tmp, "r") as handle:
            if handle.attrs.get("kind") != schema.LATENTS_KIND or schema.LATENT not in handle:
                raise ProtoalignError(f"cannot resume from {tmp}: not a protoalign latent file; use --overwrite to start over")
            old = schema.LatentHeader.from_attrs(handle.attrs)
    except OSError as exc:
        raise ProtoalignError(f"cannot resume from {tmp}, it is unreadable ({exc}); use --overwrite to start over") from None
    for field in ("model_sha256", "head", "source_files", "dtype", "shard", "n_configs_selected", "layout"):
        if getattr(old, field) != getattr(header, field):
            raise ProtoalignError(f"cannot resume {tmp}: its {field} differs from this run's; use --overwrite to start over")


def count_inputs(configs: Sequence[Path], known_numbers: set[int], max_configs: int | None) -> list[int]:
    """Configurations per input file, counting (and checking elements) only up to ``max_configs`` in all.

    Files past the cap are only checked to exist (their count is 0: nothing of them is selected).
    """
    counts: list[int] = []
    for path in configs:
        remaining = None if max_configs is None else max_configs - sum(counts)
        if remaining is not None and remaining <= 0:
            if not Path(path).is_file():
                raise ProtoalignError(f"structure file {path} does not exist")
            counts.append(0)
        else:
            counts.append(scan_structures(path, known_numbers, remaining))
    return counts


class RowBuffer:
    """Collects per-atom rows of whole batches and appends them to a LatentWriter in chunk-sized pieces.

    Fewer, larger HDF5 writes (and progress updates) than one per batch; ``flush`` writes what is held.
    """

    def __init__(self, writer: schema.LatentWriter, min_rows: int = schema.CHUNK_ROWS):
        self.writer = writer
        self.min_rows = min_rows
        self.parts: list[dict[str, np.ndarray]] = []
        self.n_rows = 0
        self.n_configs = 0

    def add(self, rows: dict[str, np.ndarray], n_configs: int) -> None:
        """Hold the rows of ``n_configs`` complete configurations; write once ``min_rows`` are held."""
        self.parts.append(rows)
        self.n_rows += len(rows[schema.ATOMIC_NUMBER])
        self.n_configs += n_configs
        if self.n_rows >= self.min_rows:
            self.flush()

    def flush(self) -> None:
        """Append everything held to the file (then forget it)."""
        if not self.parts:
            return
        rows = {name: np.concatenate([part[name] for part in self.parts]) for name in self.parts[0]}
        with _signals_deferred():  # rows and progress attributes are written together or not at all
            self.writer.append(rows, self.n_configs)
            self.parts, self.n_rows, self.n_configs = [], 0, 0


def _write_batch(model, capture, slices, info, head, pending, buffer: RowBuffer, device, torch_geometric) -> None:
    rows = rows_for_atoms(model, capture, slices, info, head, [atoms for _, _, atoms in pending], device, torch_geometric)
    rows[schema.CONFIG_INDEX] = np.concatenate([np.full(len(a), local, dtype=np.int64) for _, local, a in pending])
    rows[schema.SOURCE_FILE_INDEX] = np.concatenate([np.full(len(a), f) for f, _, a in pending]).astype(np.int32)
    buffer.add(rows, len(pending))


def merge_latents(inputs: Sequence[Path], out: Path, overwrite: bool = False) -> dict:
    """Concatenate latent files of one model into ``out``, rows in input order, streaming.

    All inputs must come from the same model (sha256), head, dtype and latent layout. Source
    files are unioned and ``source_file_index`` remapped; rows keep their (file, config, atom)
    labels, so a merge of shards equals an unsharded run up to row order.
    """
    import h5py

    from protoalign_cli.io.outputs import atomic_output

    if not inputs:
        raise ProtoalignError("give at least one latent file to merge")
    if len({Path(p).resolve() for p in inputs}) < len(inputs):
        raise ProtoalignError("the same latent file is given more than once")
    headers, rows = [], 0
    for path in inputs:
        with schema.open_latents(path) as handle:
            headers.append(schema.LatentHeader.from_attrs(handle.attrs))
            rows += handle[schema.ATOMIC_NUMBER].shape[0]
    first = headers[0]
    for path, header in zip(inputs[1:], headers[1:]):
        for field in ("model_sha256", "head", "dtype", "layout"):
            if getattr(header, field) != getattr(first, field):
                raise ProtoalignError(f"cannot merge {path}: its {field} differs from {inputs[0]}'s")
    _check_disjoint_shards(inputs, headers)
    sources: list[str] = []
    for header in headers:
        sources += [s for s in header.source_files if s not in sources]
    merged = schema.LatentHeader(**{**vars(first), "source_files": sources, "shard": "merged", "command_line": command_line(),
                                    "n_configs_selected": sum(h.n_configs_selected for h in headers)})
    latent_dim = sum(block["size"] for block in first.layout)
    with atomic_output(Path(out), overwrite) as tmp, h5py.File(tmp, "w") as target:
        writer = schema.LatentWriter(target, merged, latent_dim, first.dtype)
        for path, header in zip(inputs, headers):
            remap = np.array([sources.index(s) for s in header.source_files], dtype=np.int32)
            with schema.open_latents(path) as handle:
                n = handle[schema.ATOMIC_NUMBER].shape[0]
                for start in range(0, n, 1 << 16):
                    part = {name: handle[name][start:start + (1 << 16)] for name in (schema.LATENT, *schema.PER_ATOM_DATASETS)}
                    part[schema.SOURCE_FILE_INDEX] = remap[part[schema.SOURCE_FILE_INDEX]]
                    writer.append(part, 0)
            target.attrs["configs_done"] = writer.configs_done + header.n_configs_selected
        writer.finish()
    result = {"out": str(out), "n_atoms": rows, "n_configs": merged.n_configs_selected}
    write_summary(summary_path(out), run_summary("merge-latents", {"inputs": [str(p) for p in inputs]}, result))
    return result


def _check_disjoint_shards(inputs: Sequence[Path], headers: Sequence[schema.LatentHeader]) -> None:
    """Refuse inputs that would repeat atoms: runs over the same source files must be distinct shards I/N of one N."""
    groups: dict[tuple, list[tuple[Path, str]]] = {}
    for path, header in zip(inputs, headers):
        groups.setdefault(tuple(header.source_files), []).append((path, header.shard))
    for members in groups.values():
        if len(members) < 2:
            continue
        shards = [shard for _, shard in members]
        counts = {shard.split("/")[-1] for shard in shards}
        if "merged" in shards or len(counts) > 1 or len(set(shards)) < len(shards):
            listing = ", ".join(f"{path} ({shard})" for path, shard in members)
            raise ProtoalignError(f"these inputs cover the same source files and would repeat atoms: {listing}")
