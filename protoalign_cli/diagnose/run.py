"""``protoalign diagnose`` end to end: request → read → assign → diagnostics → report (atomic output)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from protoalign_cli.diagnose.context import DiagnosticContext
from protoalign_cli.diagnose.diagnostics import DIAGNOSTICS
from protoalign_cli.diagnose.results import DiagnoseResults, verdict_lines
from protoalign_cli.diagnose.settings import (
    DEFAULT_ENERGY_KEY,
    DEFAULT_MAP_METHOD,
    DEFAULT_RADIUS_FACTOR,
    DEFAULT_SPREAD_THRESHOLD_MEV,
    MAP_METHODS,
)
from protoalign_cli.diagnose.stats import fixed_molecule_files
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io.outputs import atomic_directory, check_writable


@dataclasses.dataclass
class DiagnoseRequest:
    """Everything ``protoalign diagnose`` was asked to do (spread threshold in meV)."""

    prototypes: Path
    configs: Sequence[Path]
    out: Path
    model: Path | None = None
    model_head: str | None = None
    foundation_model: str | None = None
    energy_key: str | None = None  # None: DEFAULT_ENERGY_KEY, and a missing key skips the predictor
    map_method: str = DEFAULT_MAP_METHOD
    radius_factor: float = DEFAULT_RADIUS_FACTOR
    spread_threshold_meV: float = DEFAULT_SPREAD_THRESHOLD_MEV
    fail_below_coverage: float | None = None
    device: str = "cpu"
    batch_size: int = 32
    overwrite: bool = False


def check_request(request: DiagnoseRequest) -> None:
    """Raise ProtoalignError for option values that cannot work (before any heavy work)."""
    if request.radius_factor <= 0:
        raise ProtoalignError("--radius-factor must be > 0")
    if request.spread_threshold_meV <= 0:
        raise ProtoalignError("--spread-threshold must be > 0 (meV)")
    if request.fail_below_coverage is not None and not 0 <= request.fail_below_coverage <= 1:
        raise ProtoalignError("--fail-below-coverage must be between 0 and 1")
    if request.batch_size < 1:
        raise ProtoalignError("--batch-size must be >= 1")
    if not request.configs:
        raise ProtoalignError("give at least one --configs file")
    for path in request.configs:
        if not Path(path).is_file():
            raise ProtoalignError(f"target file {path} does not exist")
    if request.map_method not in MAP_METHODS:
        raise ProtoalignError(f"--map must be {' or '.join(MAP_METHODS)}")
    if request.map_method == "tsne":
        try:
            import sklearn.manifold  # noqa: F401
        except ImportError:
            raise ProtoalignError("--map tsne needs scikit-learn (pip install scikit-learn); or use --map pca") from None
    if request.model is not None and not Path(request.model).is_file():
        raise ProtoalignError(f"fine-tuned model {request.model} does not exist")
    check_writable(Path(request.out), request.overwrite)


@dataclasses.dataclass
class Targets:
    """The target configurations (ase.Atoms of every file, in order) and how many each file holds."""

    paths: Sequence[Path]
    atoms: list
    counts: list[int]

    def check_elements(self, info) -> None:
        """Refuse a configuration with an element the model (``info``: its ModelInfo) lacks, naming the file,
        the configuration's position in it and the element, before any model evaluation."""
        from protoalign_cli.io.structures import check_elements

        known = set(info.atomic_numbers)
        starts = np.cumsum([0, *self.counts])
        for path, start, count in zip(self.paths, starts, self.counts):
            for position, atoms in enumerate(self.atoms[start:start + count]):
                check_elements(atoms.numbers, known, path, position)


# mace's default --forces_key and ASE's calculator forces: not used here, but NaN or inf there is broken data
FORCES_KEYS = ("REF_forces", "forces")


def read_targets(paths: Sequence[Path], energy_key: str) -> Targets:
    """Read every configuration of the target files; refuse an empty file, and NaN or inf in positions (Å),
    reference energies under ``energy_key`` (eV) or forces (``FORCES_KEYS``), naming file and configuration."""
    from protoalign_cli.io.structures import read_structures

    frames = [read_structures(Path(path), keys=[energy_key, *FORCES_KEYS]) for path in paths]
    return Targets(list(paths), [atoms for part in frames for atoms in part], [len(part) for part in frames])


def latents_with_progress(model, info, atoms_list: Sequence, head: str, batch_size: int, device: str,
                          desc: str) -> dict[str, np.ndarray]:
    """``latents_of_atoms`` over ``atoms_list``, one call per batch (the same batches as one call makes), with
    progress per configuration (``protoalign_cli.progress``); ``config_index`` counts over the whole list."""
    from protoalign_cli.mace.latents import latents_of_atoms
    from protoalign_cli.progress import progress

    parts = []
    with progress(total=len(atoms_list), desc=desc, unit="config") as bar:
        for start in range(0, len(atoms_list), batch_size):
            batch = atoms_list[start:start + batch_size]
            rows = latents_of_atoms(model, info, batch, head, batch_size, device)
            rows["config_index"] = rows["config_index"] + start
            parts.append(rows)
            bar.update(len(batch))
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def reference_energy(atoms, key: str) -> float | None:
    """The configuration's reference energy (eV) under ``key`` (info, or a calculator's results), or None."""
    if key in atoms.info:
        return float(atoms.info[key])
    results = getattr(atoms.calc, "results", None) or {}
    if key in results:
        return float(results[key])
    return None


def finetuned_energies(request: DiagnoseRequest, targets: Targets):
    """The fine-tuned model's per-atom energy minus its own E0 (eV), its ModelInfo and head; Nones without one."""
    from protoalign_cli.mace.models import describe_model, load_model

    if request.model is None:
        return None, None, None
    model = load_model(Path(request.model), request.device)
    info = describe_model(model, Path(request.model))
    head = request.model_head or info.heads[0]
    if head not in info.heads:
        raise ProtoalignError(f"--finetuned-head {head!r} is not one of the model's heads: {', '.join(info.heads)}")
    targets.check_elements(info)
    rows = latents_with_progress(model, info, targets.atoms, head, request.batch_size, request.device,
                                 "diagnose: fine-tuned model")
    return rows["energy_minus_e0"], info, head


def diagnose_context(context: DiagnosticContext) -> DiagnoseResults:
    """Every registered diagnostic of the context, and the verdict (no I/O; figures come later)."""
    parts = {key: diagnostic(context) for key, diagnostic in DIAGNOSTICS.items()}
    verdict, safe = verdict_lines(list(parts.values()), context.element_names)
    return DiagnoseResults(context.n_configs, context.n_atoms, parts, verdict, safe)


def report_inputs(request: DiagnoseRequest, prototypes, counts: list[int], finetuned_info,
                  finetuned_head: str | None, energy_key: str) -> dict:
    """The ``inputs`` of report.json: paths as given (the pretrained model: ``--foundation-model`` as typed, a
    path or a foundation name, else the path the prototype file records), each model with its sha256."""
    from protoalign_cli.io.provenance import sha256_file

    return {
        "prototypes": str(request.prototypes), "prototypes_sha256": sha256_file(Path(request.prototypes)),
        "configs": [str(p) for p in request.configs], "configs_per_file": counts,
        "foundation_model": str(request.foundation_model or prototypes.model_path),
        "foundation_model_sha256": prototypes.model_sha256,
        "head": prototypes.head, "model": str(request.model) if request.model else None,
        "model_sha256": finetuned_info.sha256 if finetuned_info else None, "model_head": finetuned_head,
        "energy_key": energy_key, "radius_factor": request.radius_factor,
        "spread_threshold_meV": request.spread_threshold_meV, "map": request.map_method,
        "fail_below_coverage": request.fail_below_coverage,
    }


def run_diagnose(request: DiagnoseRequest) -> DiagnoseResults:
    """Diagnose a target against prototypes; write report.json, report.md and figures into ``out``.

    The folder appears complete or not at all. Returns the results (the verdict lines, ``safe``,
    ``coverage.overall``).
    """
    from protoalign_cli.diagnose.report import write_report
    from protoalign_cli.io.provenance import run_summary
    from protoalign_cli.io.structures import label_keys
    from protoalign_cli.io.schema import ATOMIC_NUMBER, LATENT
    from protoalign_cli.mace.models import describe_model, load_model
    from protoalign_cli.progress import progress
    from protoalign_cli.prototypes.assignment import assignment_of, check_head, load_prototypes, pretrained_model

    check_request(request)
    prototypes = load_prototypes(Path(request.prototypes))
    foundation_path = pretrained_model(prototypes, request.foundation_model, missing_hint="pass --foundation-model PATH")
    energy_key = request.energy_key or DEFAULT_ENERGY_KEY
    targets = read_targets(request.configs, energy_key)
    references = [reference_energy(atoms, energy_key) for atoms in targets.atoms]
    if request.energy_key is not None and all(e is None for e in references):
        raise ProtoalignError(f"no target configuration has the energy key {energy_key!r} "
                              f"(keys: {', '.join(label_keys(targets.atoms)) or 'none'})")

    foundation = load_model(foundation_path, request.device, prototypes.latent_dtype)
    foundation_info = describe_model(foundation, foundation_path)
    check_head(prototypes, foundation_info.heads, foundation_path)
    targets.check_elements(foundation_info)
    target = latents_with_progress(foundation, foundation_info, targets.atoms, prototypes.head, request.batch_size,
                                   request.device, "diagnose: pretrained model")
    assignment = assignment_of(prototypes, target[LATENT], target[ATOMIC_NUMBER])
    finetuned_eps, finetuned_info, finetuned_head = finetuned_energies(request, targets)

    file_of_config = np.repeat(np.arange(len(targets.counts)), targets.counts)
    context = DiagnosticContext(
        prototypes, assignment, target, references, finetuned_eps, file_of_config[target["config_index"]],
        fixed_molecule_files(targets.atoms, targets.counts), request.radius_factor, request.spread_threshold_meV,
        request.map_method,
    )
    results = diagnose_context(context)
    summary = run_summary("diagnose", report_inputs(request, prototypes, targets.counts, finetuned_info,
                                                    finetuned_head, energy_key))
    parts = list(results.parts.values())
    with (atomic_directory(Path(request.out), request.overwrite) as folder,
          progress(total=len(parts), desc="diagnose: figures", unit="diagnostic") as bar):
        for part in parts:
            results.figures += [path.name for path in part.figures(folder, context)]
            bar.update()
        write_report(folder, summary, results)
    return results
