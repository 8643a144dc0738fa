"""Stage 3: fine-tune with mace_run_train plus the prototype alignment term.

``run_finetune`` parses the mace_run_train arguments with MACE's own parser, checks that the
prototypes come from the foundation model being fine-tuned (sha256), assigns every target atom
(training and validation files) to its nearest prototype in the latent space of the *pretrained*
model (once, batched; cached in ``WORK_DIR/protoalign/``), turns the assignments into per-atom
targets ε* (eV) and weights, and runs MACE's ``run_train.main`` with the wrappers of
``protoalign_cli.mace_patch``. The run is recorded in ``WORK_DIR/protoalign_finetune.json``, the
term per epoch in ``WORK_DIR/protoalign/align_<name>_run-<seed>.jsonl``.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from protoalign_cli.alignment import AlignmentSettings, atom_targets_and_weights, check_settings
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.mace_patch import PRETRAINING_HEAD, AlignmentTable, AlignmentTracker, patched_mace
from protoalign_cli.provenance import run_summary, sha256_file, write_summary

MISSING_ELEMENT_POLICIES = ("error", "ignore")
RECORD_NAME = "protoalign_finetune.json"
CONFIG_CHUNK = 1024  # configurations whose latents are held in memory at once


@dataclasses.dataclass
class FinetuneRequest:
    """Everything ``protoalign finetune`` was asked to do (``mace_args``: what follows ``--``)."""

    prototypes: Path
    mace_args: Sequence[str]
    settings: AlignmentSettings = dataclasses.field(default_factory=AlignmentSettings)
    missing_elements: str = "error"
    batch_size: int = 32


@dataclasses.dataclass(frozen=True)
class TargetFile:
    """A target-data file of a head: ``role`` is 'train' or 'valid'."""

    head: str
    role: str
    path: str


def parse_mace_args(mace_args: Sequence[str]):
    """Parse mace_run_train arguments with MACE's own parser (YAML ``--config`` included).

    Unknown options and parser errors become a one-line ProtoalignError.
    """
    import mace  # noqa: F401  (must precede e3nn)
    from mace.tools import build_default_arg_parser

    parser = build_default_arg_parser()

    def fail(message: str):
        raise ProtoalignError(f"mace_run_train arguments: {message}")

    parser.error = fail
    args, unknown = parser.parse_known_args(list(mace_args))
    if unknown:
        raise ProtoalignError(
            f"unknown mace_run_train option(s): {' '.join(unknown)} "
            "(protoalign options go before '--', mace_run_train options after it)"
        )
    return args


def target_files(args) -> list[TargetFile]:
    """The training and validation files of every head except MACE's replay head 'pt_head'."""
    if args.heads is not None:
        try:
            heads = ast.literal_eval(args.heads) if isinstance(args.heads, str) else dict(args.heads)
        except (ValueError, SyntaxError):
            raise ProtoalignError(f"--heads must be a Python dict literal, got {args.heads!r}") from None
        if not isinstance(heads, dict) or not all(isinstance(spec, dict) for spec in heads.values()):
            raise ProtoalignError(f"--heads must map head names to dicts, got {args.heads!r}")
    else:
        heads = {"Default": {"train_file": args.train_file, "valid_file": args.valid_file}}
    files: list[TargetFile] = []
    for head, spec in heads.items():
        if head == PRETRAINING_HEAD:
            continue
        for role in ("train", "valid"):
            paths = spec.get(f"{role}_file")
            for path in [paths] if isinstance(paths, str) else list(paths or []):
                if TargetFile(head, role, path) not in files:
                    files.append(TargetFile(head, role, path))
    if not any(f.role == "train" for f in files):
        raise ProtoalignError("no training file among the mace_run_train arguments (give --train_file)")
    for f in files:
        if not Path(f.path).exists():
            raise ProtoalignError(f"{f.role} file {f.path} does not exist")
    return files


def check_foundation_head(foundation_head: str | None, heads: Sequence[str], prototypes_head: str) -> None:
    """Refuse to fine-tune a multi-head foundation from another head than the prototypes describe.

    MACE keeps ``--foundation_head``, or else the first head that is not 'pt_head'.
    """
    if len(heads) < 2:
        return
    kept = foundation_head or next((h for h in heads if h != PRETRAINING_HEAD), heads[0])
    if kept != prototypes_head:
        raise ProtoalignError(f"mace_run_train will fine-tune head {kept!r} of the foundation model, but the "
                              f"prototypes describe head {prototypes_head!r}; pass --foundation_head "
                              f"{prototypes_head} or build prototypes of head {kept!r}")


def launch_rank(args) -> tuple[int, int]:
    """(rank, local rank) of this process as its launcher tells it, read like MACE does before it initialises DDP."""
    if not args.distributed or args.launcher == "none":
        return 0, 0
    names = {
        "slurm": (("SLURM_PROCID", "RANK"), ("SLURM_LOCALID", "LOCAL_RANK")),
        "mpi": (("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_LOCAL_RANK",)),
    }.get(args.launcher, (("RANK",), ("LOCAL_RANK",)))

    def first_set(candidates: tuple[str, ...]) -> int:
        return int(next((os.environ[name] for name in candidates if name in os.environ), 0))

    return first_set(names[0]), first_set(names[1])


def precompute_device(args) -> str:
    """Where the pretrained model runs over the target data: this rank's GPU under DDP, else --device."""
    if args.distributed and args.device == "cuda":
        return f"cuda:{launch_rank(args)[1]}"
    return args.device


def read_configurations(path: str, r_max: float, atomic_numbers: Sequence[int]) -> list:
    """ase.Atoms of every configuration of a target file: anything ASE reads, or MACE HDF5 (file or folder)."""
    import ase.io
    from mace.tools.scripts_utils import check_path_ase_read

    if check_path_ase_read(path):
        try:
            return list(ase.io.read(path, index=":"))
        except Exception as exc:
            raise ProtoalignError(f"cannot read structures from {path}: {type(exc).__name__}: {exc}") from exc
    source = Path(path)
    files = sorted(source.glob("*.h5")) + sorted(source.glob("*.hdf5")) if source.is_dir() else [source]
    if not files or any(f.suffix not in (".h5", ".hdf5") for f in files):
        raise ProtoalignError(f"{path}: protoalign finetune reads target data that ASE reads or MACE HDF5 files, "
                              "not LMDB")
    return [atoms for f in files for atoms in _read_mace_hdf5(f, r_max, atomic_numbers)]


def _read_mace_hdf5(path: Path, r_max: float, atomic_numbers: Sequence[int]) -> Iterator:
    """Configurations of a MACE HDF5 file (mace_prepare_data) through MACE's own HDF5Dataset."""
    import ase
    from mace.data import HDF5Dataset
    from mace.tools import AtomicNumberTable
    from mace.tools.torch_tools import default_dtype

    table = AtomicNumberTable(list(atomic_numbers))
    try:
        with default_dtype("float64"):
            dataset = HDF5Dataset(str(path), r_max=r_max, z_table=table)
            for index in range(len(dataset)):
                data = dataset[index]
                numbers = np.asarray(table.zs)[data.node_attrs.argmax(dim=-1).numpy()]
                pbc = data.pbc.reshape(-1).tolist() if getattr(data, "pbc", None) is not None else False
                yield ase.Atoms(numbers=numbers, positions=data.positions.numpy(),
                                cell=data.cell.reshape(3, 3).numpy(), pbc=pbc)
    except (OSError, KeyError, ValueError) as exc:
        raise ProtoalignError(f"cannot read MACE HDF5 file {path}: {type(exc).__name__}: {exc}") from exc


def is_isolated_atom(atoms) -> bool:
    """Whether a configuration is an E0 reference (one atom, config_type IsolatedAtom), which MACE does not train on."""
    return len(atoms) == 1 and atoms.info.get("config_type") == "IsolatedAtom"


def data_digest(files: Sequence[TargetFile], prototypes_sha256: str, dtype: str, heads: str) -> str:
    """sha256 naming an assignment: the target files' bytes, the prototype file, the dtype, the heads used."""
    entries = []
    for f in files:
        source = Path(f.path)
        parts = sorted(source.iterdir()) if source.is_dir() else [source]
        entries.append([f.head, f.role, [sha256_file(p) for p in parts if p.is_file()]])
    text = json.dumps({"files": entries, "prototypes": prototypes_sha256, "dtype": dtype, "heads": heads})
    return hashlib.sha256(text.encode()).hexdigest()


def compute_assignment(model, info, prototypes, files: Sequence[TargetFile], batch_size: int, device: str) -> dict:
    """Assign every atom of the target files to its nearest prototype in the pretrained latent space.

    Returns per-atom ``atomic_numbers``, ``positions`` (Å), ``prototype_id`` (-1: element has none),
    ``distance`` (standardized latent units), plus ``config_offsets`` [n_configs + 1] and per-config
    ``config_role`` (0 train, 1 valid).
    """
    from protoalign_cli.extract import latents_of_atoms
    from protoalign_cli.prototypes import assign

    numbers, positions, ids, distances, lengths, roles = [], [], [], [], [], []
    for f in files:
        configurations = [a for a in read_configurations(f.path, info.r_max, info.atomic_numbers)
                          if not is_isolated_atom(a)]
        if not configurations:
            raise ProtoalignError(f"{f.role} file {f.path} holds no configurations")
        for start in range(0, len(configurations), CONFIG_CHUNK):
            chunk = configurations[start:start + CONFIG_CHUNK]
            rows = latents_of_atoms(model, info, chunk, head=prototypes.head, batch_size=batch_size, device=device)
            prototype_id, distance = assign(prototypes, rows["latent"], rows["atomic_number"])
            ids.append(np.asarray(prototype_id, dtype=np.int64))
            distances.append(np.asarray(distance, dtype=np.float64))
            numbers += [np.asarray(a.numbers, dtype=np.int64) for a in chunk]
            positions += [np.asarray(a.positions, dtype=np.float64) for a in chunk]
            lengths += [len(a) for a in chunk]
            roles += [0 if f.role == "train" else 1] * len(chunk)
    return {
        "atomic_numbers": np.concatenate(numbers), "positions": np.concatenate(positions),
        "prototype_id": np.concatenate(ids), "distance": np.concatenate(distances),
        "config_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "config_role": np.asarray(roles, dtype=np.int8),
    }


def save_assignment(path: Path, assignment: dict) -> None:
    """Write an assignment cache atomically (every DDP rank may write the same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, **assignment)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def load_assignment(path: Path) -> dict | None:
    """Read an assignment cache, or None when absent or unreadable (it is then recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as handle:
            return {name: handle[name] for name in handle.files}
    except (OSError, ValueError, KeyError):
        return None


def build_table(assignment: dict, prototypes, settings: AlignmentSettings,
                dtype: str) -> tuple[AlignmentTable, np.ndarray]:
    """The lookup table of per-atom targets (eV) and weights; also returns the per-atom weights."""
    target, weight = atom_targets_and_weights(
        assignment["prototype_id"], assignment["distance"], prototypes.radius,
        prototypes.energy_mean, prototypes.energy_std, settings,
    )
    table = AlignmentTable(dtype)
    offsets = assignment["config_offsets"]
    for start, stop in zip(offsets[:-1], offsets[1:]):
        table.add(assignment["atomic_numbers"][start:stop], assignment["positions"][start:stop],
                  target[start:stop], weight[start:stop])
    return table, weight


def check_missing_elements(assignment: dict, policy: str) -> list[str]:
    """Element symbols of the target without prototypes; an error unless ``policy`` is 'ignore'."""
    from ase.data import chemical_symbols

    missing = np.unique(assignment["atomic_numbers"][assignment["prototype_id"] < 0])
    symbols = [chemical_symbols[int(z)] for z in missing]
    if symbols and policy == "error":
        raise ProtoalignError(
            f"target element(s) {', '.join(symbols)} have no prototypes; build prototypes from source data "
            "containing them, or pass --align-missing-elements ignore to give their atoms weight 0"
        )
    return symbols


def assignment_statistics(assignment: dict, weight: np.ndarray, prototypes) -> dict:
    """Per element and overall: atoms, fraction with w > 0, mean w, and distance d / prototype radius R.

    d/R is summarized by its median and the fraction of atoms with d <= R (inside the radius that
    holds 95 % of the prototype's own members); a mean would be dominated by prototypes of almost
    zero radius (clusters of near-duplicate source atoms).
    """
    from ase.data import chemical_symbols

    ids = assignment["prototype_id"]
    assigned = ids >= 0
    radius = np.asarray(prototypes.radius, dtype=np.float64)[np.where(assigned, ids, 0)]
    distance = np.asarray(assignment["distance"], dtype=np.float64)
    ratio = np.full(len(ids), np.inf)
    np.divide(distance, radius, out=ratio, where=assigned & (radius > 0))
    ratio[assigned & (radius == 0) & (distance == 0)] = 0.0

    def summarize(mask: np.ndarray) -> dict:
        inside = mask & assigned
        return {
            "atoms": int(mask.sum()),
            "fraction_weighted": float((weight[mask] > 0).mean()) if mask.any() else 0.0,
            "mean_weight": float(weight[mask].mean()) if mask.any() else 0.0,
            "median_distance_over_radius": float(np.median(ratio[inside])) if inside.any() else None,
            "fraction_within_radius": float((ratio[inside] <= 1).mean()) if inside.any() else 0.0,
        }

    numbers = assignment["atomic_numbers"]
    roles = assignment["config_role"]
    return {
        "configurations": {"train": int((roles == 0).sum()), "valid": int((roles == 1).sum())},
        "all": summarize(np.ones(len(ids), dtype=bool)),
        "per_element": {chemical_symbols[int(z)]: summarize(numbers == z) for z in np.unique(numbers)},
    }


def run_finetune(request: FinetuneRequest) -> dict:
    """Fine-tune with mace_run_train plus the alignment term; return the run record (also written to disk)."""
    from protoalign_cli.models import describe_model, load_model, resolve_model_path
    from protoalign_cli.prototypes import load_prototypes

    check_settings(request.settings)
    if request.missing_elements not in MISSING_ELEMENT_POLICIES:
        raise ProtoalignError(f"--align-missing-elements must be one of {', '.join(MISSING_ELEMENT_POLICIES)}")
    if request.batch_size < 1:
        raise ProtoalignError("--batch-size must be >= 1")
    args = parse_mace_args(request.mace_args)
    if args.foundation_model is None:
        raise ProtoalignError("protoalign finetune needs --foundation_model among the mace_run_train arguments")
    settings = request.settings
    if settings.decay != "none" and settings.decay_epochs is None:
        settings = dataclasses.replace(settings, decay_epochs=max(1, args.max_num_epochs - settings.warmup_epochs))
    prototypes_path = Path(request.prototypes)
    prototypes = load_prototypes(prototypes_path)
    model_path = resolve_model_path(args.foundation_model)
    model_sha256 = sha256_file(model_path)
    if model_sha256 != prototypes.model_sha256:
        raise ProtoalignError(
            f"{prototypes_path} was built from a different model (sha256 {prototypes.model_sha256[:12]}...) "
            f"than --foundation_model {args.foundation_model} (sha256 {model_sha256[:12]}...)"
        )
    files = target_files(args)
    prototypes_sha256 = sha256_file(prototypes_path)
    digest = data_digest(files, prototypes_sha256, args.default_dtype, f"{prototypes.head}/{args.foundation_head}")
    work_dir = Path(args.work_dir)
    cache_path = work_dir / "protoalign" / f"assignment-{model_sha256[:12]}-{digest[:12]}.npz"
    started = time.perf_counter()
    assignment = load_assignment(cache_path)
    cache_reused = assignment is not None
    if assignment is None:
        device = precompute_device(args)
        model = load_model(model_path, device, args.default_dtype)
        info = describe_model(model, model_path)
        check_foundation_head(args.foundation_head, info.heads, prototypes.head)
        assignment = compute_assignment(model, info, prototypes, files, request.batch_size, device)
        del model
        save_assignment(cache_path, assignment)
    ignored = check_missing_elements(assignment, request.missing_elements)
    if ignored:
        logging.warning(f"protoalign: target element(s) {', '.join(ignored)} have no prototypes; "
                        "their atoms get weight 0")
    table, weight = build_table(assignment, prototypes, settings, args.default_dtype)
    assignment_seconds = time.perf_counter() - started

    tag = f"{args.name}_run-{args.seed}"
    jsonl_path = work_dir / "protoalign" / f"align_{tag}.jsonl"
    inputs = {
        "prototypes": str(prototypes_path), "prototypes_sha256": prototypes_sha256,
        "foundation_model": str(model_path), "foundation_sha256": model_sha256,
        "mace_args": list(request.mace_args), "settings": dataclasses.asdict(settings),
        "missing_elements": request.missing_elements, "target_files": [dataclasses.asdict(f) for f in files],
    }
    results = {
        "status": "running", "assignment_cache": str(cache_path), "assignment_cache_reused": cache_reused,
        "assignment_seconds": assignment_seconds,
        "elements_without_prototypes": ignored,
        "assignment": assignment_statistics(assignment, weight, prototypes), "align_log": str(jsonl_path),
    }
    is_rank_zero = launch_rank(args)[0] == 0
    record_path = work_dir / RECORD_NAME
    if is_rank_zero:
        work_dir.mkdir(parents=True, exist_ok=True)
        write_summary(record_path, run_summary("finetune", inputs, results))
    tracker = AlignmentTracker(table, settings, jsonl_path)
    try:
        run_mace_train(request.mace_args, tracker)
    except BaseException as exc:
        results["status"] = f"failed: {type(exc).__name__}: {exc}"
        if is_rank_zero:
            write_summary(record_path, run_summary("finetune", inputs, results))
        if isinstance(exc, Exception) and not isinstance(exc, ProtoalignError):
            debug_log = Path(args.log_dir or work_dir / "logs") / f"{tag}_debug.log"
            raise ProtoalignError(f"mace_run_train failed: {type(exc).__name__}: {exc} "
                                  f"(traceback in {debug_log})") from exc
        raise
    results["status"] = "finished"
    results["epochs_logged"] = len([r for r in tracker.records if not r["initial"]])
    results["last_epoch"] = tracker.records[-1] if tracker.records else None
    if is_rank_zero:
        write_summary(record_path, run_summary("finetune", inputs, results))
    return {"inputs": inputs, "results": results, "record": str(record_path)}


def run_mace_train(mace_args: Sequence[str], tracker: AlignmentTracker) -> None:
    """Run ``mace.cli.run_train.main`` on ``mace_args`` with the alignment wrappers in place."""
    from mace.cli import run_train

    with mace_process_state(mace_args), patched_mace(tracker):
        try:
            run_train.main()
        except Exception:
            logging.debug("mace_run_train failed", exc_info=True)  # into MACE's *_debug.log only
            raise


@contextlib.contextmanager
def mace_process_state(mace_args: Sequence[str]) -> Iterator[None]:
    """Set ``sys.argv`` for ``run_train.main``; restore what MACE changes (argv, root logger, torch dtype).

    So several runs can share one process (tests, notebooks) without duplicated log handlers.
    """
    import torch

    root = logging.getLogger()
    handlers, filters, level = list(root.handlers), list(root.filters), root.level
    dtype, argv = torch.get_default_dtype(), sys.argv
    sys.argv = ["mace_run_train", *mace_args]
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers, root.filters, root.level = handlers, filters, level
        torch.set_default_dtype(dtype)
        sys.argv = argv
