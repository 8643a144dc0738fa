"""Stage 3: fine-tune with mace_run_train plus loss terms (by default the prototype energy alignment term).

``run_finetune`` first parses the mace_run_train arguments with MACE's own parser and checks the
target files and the output folders (writable; no earlier run unless ``--overwrite`` or mace's
``--restart_latest``), all before torch is imported. It then checks that the installed mace-torch has
every name the trainer hooks use and that the prototypes come from the foundation model being
fine-tuned (sha256), assigns every target atom (training and validation
files) to its nearest prototype in the latent space of the *pretrained* model (once, batched;
cached in ``WORK_DIR/protoalign/``), builds the requested terms of ``protoalign_cli.terms`` from
the assignment, and runs MACE's ``run_train.main`` with the wrappers of
``protoalign_cli.mace.trainer_hooks``. The run is recorded in ``WORK_DIR/protoalign_finetune.json``,
the terms per epoch in ``WORK_DIR/protoalign/align_<name>_run-<seed>.jsonl``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io.schema import Prototypes
from protoalign_cli.io.provenance import run_summary, sha256_file, write_summary
from protoalign_cli.mace.arguments import (
    check_outputs,
    earlier_run,
    final_models,
    launch_rank,
    output_folders,
    parse_mace_args,
    run_tag,
)
from protoalign_cli.mace.latents import DEFAULT_BATCH_SIZE
from protoalign_cli.mace.offset import is_isolated_atom, refit_on_files, refit_path
from protoalign_cli.mace.models import PRETRAINING_HEAD, describe_model, exception_line, import_mace_quietly, load_model
from protoalign_cli.terms import TERMS
from protoalign_cli.terms.base import LossTerm, ScheduleSettings, with_decay_epochs
from protoalign_cli.terms.target_atoms import (
    TargetAtoms,
    assign_configurations,
    assignment_statistics,
    check_missing_elements,
    load_target_atoms,
    save_target_atoms,
)

MISSING_ELEMENT_POLICIES = ("error", "ignore")
RECORD_NAME = "protoalign_finetune.json"


def default_terms() -> dict[str, ScheduleSettings]:
    """The terms on by default (``LossTerm.on_by_default``) with their default settings."""
    return {name: term.settings_class() for name, term in TERMS.items() if term.on_by_default}


@dataclasses.dataclass
class FinetuneRequest:
    """Everything ``protoalign finetune`` was asked to do (``mace_args``: what follows ``--``).

    ``terms``: registry name (``protoalign_cli.terms.TERMS``) → that term's settings.
    ``assignment_batch_size``: configurations per forward pass of the pretrained model over the target data.
    ``refit_offset``: refit the fine-tuned head's E0s on the training files after training (``mace.offset``).
    ``overwrite``: replace an earlier run of the same --name and --seed in --work_dir.
    ``verbose``: mace_run_train's whole console log and every warning (else: its training loop, warnings once).
    """

    prototypes: Path
    mace_args: Sequence[str]
    terms: Mapping[str, ScheduleSettings] = dataclasses.field(default_factory=default_terms)
    missing_elements: str = MISSING_ELEMENT_POLICIES[0]
    assignment_batch_size: int = DEFAULT_BATCH_SIZE
    refit_offset: bool = False
    overwrite: bool = False
    verbose: bool = False


@dataclasses.dataclass(frozen=True)
class TargetFile:
    """A target-data file of a head: ``role`` is 'train' or 'valid'."""

    head: str
    role: str
    path: str


def target_files(args) -> list[TargetFile]:
    """The training and validation files of every head except MACE's replay head 'pt_head'.

    They and the heads' test files are checked first (``check_target_data``), before torch is imported.
    """
    if args.heads is not None:
        try:
            heads = ast.literal_eval(args.heads) if isinstance(args.heads, str) else dict(args.heads)
        except (ValueError, SyntaxError):
            raise ProtoalignError(f"--heads must be a Python dict literal, got {args.heads!r}") from None
        if not isinstance(heads, dict) or not all(isinstance(spec, dict) for spec in heads.values()):
            raise ProtoalignError(f"--heads must map head names to dicts, got {args.heads!r}")
    else:
        heads = {"Default": {"train_file": args.train_file, "valid_file": args.valid_file, "test_file": args.test_file}}
    files: list[TargetFile] = []
    for head, spec in heads.items():
        if head == PRETRAINING_HEAD:
            continue
        for role in ("train", "valid", "test"):  # a head's own files, else (train, valid) mace's options
            paths = spec.get(f"{role}_file", None if role == "test" else getattr(args, f"{role}_file"))
            for path in [paths] if isinstance(paths, str) else list(paths or []):
                if TargetFile(head, role, path) not in files:
                    files.append(TargetFile(head, role, path))
    if not any(f.role == "train" for f in files):
        raise ProtoalignError("no training file among the mace_run_train arguments (give --train_file)")
    for f in files:
        if not Path(f.path).exists():
            raise ProtoalignError(f"{f.role} file {f.path} does not exist")
    check_target_data(files, heads, args)
    return [f for f in files if f.role != "test"]


def check_target_data(files: Sequence[TargetFile], heads: Mapping[str, dict], args) -> None:
    """Refuse target data that mace_run_train would train on as NaN or fail on late, without importing torch.

    In every file that ASE reads (MACE HDF5 is checked when read, ``_read_mace_hdf5``): no configuration
    with the energy or forces label of its head (mace's --energy_key, --forces_key, or the head's own;
    no forces needed with --forces_weight 0), or a position or such a label that is NaN or inf.
    """
    from protoalign_cli.io.structures import check_label_keys, read_structures

    checked = set()
    for f in files:
        spec = heads[f.head]
        keys = {"energy": (spec.get("info_keys") or {}).get("energy", spec.get("energy_key", args.energy_key)),
                "forces": (spec.get("arrays_keys") or {}).get("forces", spec.get("forces_key", args.forces_key))}
        if args.forces_weight == 0:
            del keys["forces"]
        path, checking = Path(f.path), (f.path, *keys.values())
        if path.is_dir() or path.suffix in (".h5", ".hdf5", ".lmdb", ".aselmdb", ".mdb") or checking in checked:
            continue
        check_label_keys(path, read_structures(path, f.role, list(keys.values())), keys, f.role)
        checked.add(checking)


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


def precompute_device(args) -> str:
    """Where the pretrained model runs over the target data: this rank's GPU under DDP, else --device."""
    if args.distributed and args.device == "cuda":
        return f"cuda:{launch_rank(args)[1]}"
    return args.device


def read_configurations(path: str, r_max: float, atomic_numbers: Sequence[int]) -> list:
    """ase.Atoms of every configuration of a target file: anything ASE reads, or MACE HDF5 (file or folder)."""
    from mace.tools.scripts_utils import check_path_ase_read

    from protoalign_cli.io.structures import iter_structures

    if check_path_ase_read(path):
        return list(iter_structures(Path(path)))
    source = Path(path)
    files = sorted(source.glob("*.h5")) + sorted(source.glob("*.hdf5")) if source.is_dir() else [source]
    if not files or any(f.suffix not in (".h5", ".hdf5") for f in files):
        raise ProtoalignError(f"{path}: protoalign finetune reads target data that ASE reads or MACE HDF5 files, "
                              "not LMDB")
    return [atoms for f in files for atoms in _read_mace_hdf5(f, r_max, atomic_numbers)]


def _read_mace_hdf5(path: Path, r_max: float, atomic_numbers: Sequence[int]) -> Iterator:
    """Configurations of a MACE HDF5 file (mace_prepare_data) through MACE's own HDF5Dataset; each refused
    when its positions, energy or forces hold NaN or inf."""
    import ase
    from mace.data import HDF5Dataset
    from mace.tools import AtomicNumberTable
    from mace.tools.torch_tools import default_dtype

    from protoalign_cli.io.structures import non_finite_error, non_finite_fields

    table = AtomicNumberTable(list(atomic_numbers))
    try:
        with default_dtype("float64"):
            dataset = HDF5Dataset(str(path), r_max=r_max, z_table=table)
            for index in range(len(dataset)):
                data = dataset[index]
                bad = non_finite_fields({name: getattr(data, name, None) for name in ("positions", "energy", "forces")})
                if bad:
                    raise non_finite_error(path, index, bad)
                numbers = np.asarray(table.zs)[data.node_attrs.argmax(dim=-1).numpy()]
                pbc = data.pbc.reshape(-1).tolist() if getattr(data, "pbc", None) is not None else False
                yield ase.Atoms(numbers=numbers, positions=data.positions.numpy(),
                                cell=data.cell.reshape(3, 3).numpy(), pbc=pbc)
    except (OSError, KeyError, ValueError) as exc:
        raise ProtoalignError(f"cannot read MACE HDF5 file {path}: {exception_line(exc)}") from exc


def data_digest(files: Sequence[TargetFile], prototypes_sha256: str, dtype: str, heads: str) -> str:
    """sha256 naming an assignment: the target files' bytes, the prototype file, the dtype, the heads used."""
    entries = []
    for f in files:
        source = Path(f.path)
        parts = sorted(source.iterdir()) if source.is_dir() else [source]
        entries.append([f.head, f.role, [sha256_file(p) for p in parts if p.is_file()]])
    text = json.dumps({"files": entries, "prototypes": prototypes_sha256, "dtype": dtype, "heads": heads})
    return hashlib.sha256(text.encode()).hexdigest()


def labelled_configurations(files: Sequence[TargetFile], info) -> Iterator[tuple[str, list]]:
    """(role, configurations) of each target file, read for the model ``info``, E0 reference atoms skipped;
    refused when a file holds an element the model lacks or no configuration."""
    from protoalign_cli.io.structures import check_elements, empty_file_error

    known = set(info.atomic_numbers)
    for f in files:
        configurations = []
        for index, atoms in enumerate(read_configurations(f.path, info.r_max, info.atomic_numbers)):
            check_elements(atoms.numbers, known, f.path, index)
            if not is_isolated_atom(atoms):
                configurations.append(atoms)
        if not configurations:
            raise empty_file_error(f.path, f.role)
        yield f.role, configurations


def check_request(request: FinetuneRequest) -> None:
    """Refuse unknown terms, impossible term settings and an unknown missing-element policy."""
    for name, settings in request.terms.items():
        if name not in TERMS:
            raise ProtoalignError(f"unknown loss term {name!r} (known: {', '.join(TERMS)})")
        TERMS[name].check_settings(settings)
    if request.missing_elements not in MISSING_ELEMENT_POLICIES:
        raise ProtoalignError(f"--align-missing-elements must be one of {', '.join(MISSING_ELEMENT_POLICIES)}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What run_finetune derived from the request before reading any target data."""

    args: argparse.Namespace  # mace_run_train's arguments
    prototypes_path: Path
    prototypes: Prototypes
    prototypes_sha256: str
    model_path: Path
    files: list[TargetFile]
    cache_path: Path

    @property
    def work_dir(self) -> Path:
        """mace's --work_dir."""
        return Path(self.args.work_dir)


def record_path(args: argparse.Namespace) -> Path:
    """The run record, ``WORK_DIR/protoalign_finetune.json``."""
    return Path(args.work_dir) / RECORD_NAME


def align_log_path(args: argparse.Namespace) -> Path:
    """The terms' JSONL log of the run, ``WORK_DIR/protoalign/align_<name>_run-<seed>.jsonl``."""
    return Path(args.work_dir) / "protoalign" / f"align_{run_tag(args)}.jsonl"


def own_files(args: argparse.Namespace) -> list[Path]:
    """The files protoalign adds to a run: the record, the terms' log, the refit models."""
    return [record_path(args), align_log_path(args), *map(refit_path, final_models(args))]


def check_run(request: FinetuneRequest) -> tuple[argparse.Namespace, list[TargetFile]]:
    """The checks that need neither torch nor mace (a second, not 10–20 s of imports): the request, the
    mace arguments, the output folders, the target files. Returns the mace arguments and the target files."""
    check_request(request)
    args = parse_mace_args(request.mace_args)
    if args.foundation_model is None:
        raise ProtoalignError("protoalign finetune needs --foundation_model among the mace_run_train arguments")
    check_outputs(args, request.overwrite, own_files(args))
    return args, target_files(args)


def plan_run(request: FinetuneRequest, args: argparse.Namespace, files: list[TargetFile]) -> Plan:
    """Verify the prototypes against --foundation_model; name the assignment cache of the target files."""
    from protoalign_cli.prototypes.assignment import load_prototypes, pretrained_model

    prototypes = load_prototypes(Path(request.prototypes))
    model_path = pretrained_model(prototypes, args.foundation_model)
    prototypes_sha256 = sha256_file(request.prototypes)
    digest = data_digest(files, prototypes_sha256, args.default_dtype, f"{prototypes.head}/{args.foundation_head}")
    cache_name = f"assignment-{prototypes.model_sha256[:12]}-{digest[:12]}.npz"
    return Plan(args, Path(request.prototypes), prototypes, prototypes_sha256, model_path, files,
                Path(args.work_dir) / "protoalign" / cache_name)


def target_atoms(plan: Plan, batch_size: int, keep_latents: bool) -> tuple[TargetAtoms, bool]:
    """The target atoms with their assignment, from the cache or computed (and cached); and whether cached.

    The assignment's forward pass runs in a child process (``run_isolated``): in this process it would
    warm TorchScript's graph executors, and λ = 0 would then differ from plain mace_run_train (~1e-16).
    """
    atoms = load_target_atoms(plan.cache_path, plan.prototypes, keep_latents)
    if atoms is not None:
        return atoms, True
    run_isolated(assignment_pass, plan.prototypes_path, plan.model_path, plan.files, plan.args.foundation_head,
                 plan.args.default_dtype, precompute_device(plan.args), batch_size, keep_latents, plan.cache_path)
    atoms = load_target_atoms(plan.cache_path, plan.prototypes, keep_latents)
    if atoms is None:
        raise ProtoalignError(f"the assignment pass did not leave a readable {plan.cache_path}")
    return atoms, False


def assignment_pass(prototypes_path: Path, model_path: Path, files: Sequence[TargetFile], foundation_head: str | None,
                    dtype: str, device: str, batch_size: int, keep_latents: bool, cache_path: Path) -> None:
    """Load the pretrained model, assign every target atom to its nearest prototype, write the cache."""
    from protoalign_cli.prototypes.assignment import load_prototypes

    import_mace_quietly()
    prototypes = load_prototypes(prototypes_path)
    model = load_model(model_path, device, dtype)
    info = describe_model(model, model_path)
    check_foundation_head(foundation_head, info.heads, prototypes.head)
    atoms = assign_configurations(model, info, prototypes, labelled_configurations(files, info), batch_size, device,
                                  keep_latents)
    save_target_atoms(cache_path, atoms)


def run_isolated(function, *args) -> None:
    """Run ``function(*args)`` in a fresh (spawned) Python process; its exceptions are raised here.

    Nothing it changes in the interpreter or in torch (executors, caches, RNG, CUDA context) reaches
    this process.
    """
    import concurrent.futures
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            pool.submit(function, *args).result()
        except BrokenProcessPool as exc:
            raise ProtoalignError(f"the assignment pass over the target data died ({exception_line(exc)})") from exc


def build_terms(request: FinetuneRequest, atoms: TargetAtoms, prototypes, max_num_epochs: int) -> list[LossTerm]:
    """The requested terms (registry order of the request), built for the target atoms."""
    return [TERMS[name].build(with_decay_epochs(settings, max_num_epochs), atoms, prototypes)
            for name, settings in request.terms.items()]


def statistics_weight(terms: Sequence[LossTerm], atoms: TargetAtoms) -> np.ndarray:
    """The per-atom weights the record summarizes: the first term's (the energy alignment term's by default)."""
    return terms[0].targets.weight if terms else np.zeros(len(atoms.atomic_numbers))


def run_finetune(request: FinetuneRequest) -> dict:
    """Fine-tune with mace_run_train plus the requested terms; return the run record (also written to disk)."""
    args, files = check_run(request)
    import_mace_quietly()
    from protoalign_cli.mace.trainer_hooks import check_supported

    check_supported()
    plan = plan_run(request, args, files)
    started = time.perf_counter()
    keep_latents = any(TERMS[name].needs_pretrained_latents(settings) for name, settings in request.terms.items())
    atoms, cache_reused = target_atoms(plan, request.assignment_batch_size, keep_latents)
    ignored = check_missing_elements(atoms.assignment, request.missing_elements)
    if ignored:
        logging.warning(f"protoalign: target element(s) {', '.join(ignored)} have no prototypes; "
                        "their atoms get weight 0")
    terms = build_terms(request, atoms, plan.prototypes, plan.args.max_num_epochs)
    assignment_seconds = time.perf_counter() - started

    inputs = {
        "prototypes": str(plan.prototypes_path), "prototypes_sha256": plan.prototypes_sha256,
        "foundation_model": str(plan.model_path), "foundation_sha256": plan.prototypes.model_sha256,
        "mace_args": list(request.mace_args),
        **{term.settings_key: dataclasses.asdict(term.settings) for term in terms},
        "missing_elements": request.missing_elements, "target_files": [dataclasses.asdict(f) for f in plan.files],
    }
    results = {
        "status": "running", "assignment_cache": str(plan.cache_path), "assignment_cache_reused": cache_reused,
        "assignment_seconds": assignment_seconds, "elements_without_prototypes": ignored,
        "assignment": assignment_statistics(atoms, statistics_weight(terms, atoms)),
        "align_log": str(align_log_path(plan.args)),
    }
    return train_and_record(request, plan, terms, atoms, inputs, results)


def train_and_record(request: FinetuneRequest, plan: Plan, terms: Sequence[LossTerm], atoms: TargetAtoms,
                     inputs: dict, results: dict) -> dict:
    """Run mace_run_train with the terms; write the record before (running) and after (finished / failed).

    With ``request.overwrite``, what an earlier run left (``earlier_run``) is removed first. Returns the
    record's inputs and results, its path, and the path of the fine-tuned model (stage two's with --swa).
    """
    from protoalign_cli.mace.trainer_hooks import TermTracker, configuration_index

    args, work_dir = plan.args, plan.work_dir
    is_rank_zero = launch_rank(args)[0] == 0

    def record() -> None:
        if is_rank_zero:
            work_dir.mkdir(parents=True, exist_ok=True)
            write_summary(record_path(args), run_summary("finetune", inputs, results))

    if request.overwrite and is_rank_zero:
        for path in earlier_run(args, own_files(args)):
            path.unlink()
    record()
    index = configuration_index(atoms.atomic_numbers, atoms.positions, atoms.config_offsets, args.default_dtype)
    tracker = TermTracker(terms, index, Path(results["align_log"]))
    try:
        run_mace_train(request.mace_args, tracker, request.verbose)
    except BaseException as exc:
        results["status"] = f"failed: {exception_line(exc)}"
        record()
        if isinstance(exc, Exception) and not isinstance(exc, ProtoalignError):
            debug_log = output_folders(args)["log_dir"] / f"{run_tag(args)}_debug.log"
            raise ProtoalignError(f"mace_run_train failed: {exception_line(exc)} "
                                  f"(traceback in {debug_log})") from exc
        raise
    results["status"] = "finished"
    results["epochs_logged"] = len([r for r in tracker.records if not r["initial"]])
    results["last_epoch"] = tracker.records[-1] if tracker.records else None
    model = next((path for path in reversed(final_models(args)) if path.is_file()), final_models(args)[0])
    if request.refit_offset and is_rank_zero:
        split = None if any(f.role == "valid" for f in plan.files) else args.valid_fraction  # mace split the train file
        model, refit = refit_on_files(model, [f.path for f in plan.files if f.role == "train"], args.energy_key, split,
                                      args.seed)
        results["offset_refit"] = refit.as_dict()
    results["model"] = str(model)
    record()
    return {"inputs": inputs, "results": results, "record": str(record_path(args)), "model": str(model)}


def run_mace_train(mace_args: Sequence[str], tracker, verbose: bool = False) -> None:
    """Run ``mace.cli.run_train.main`` on ``mace_args`` with the wrappers of ``tracker`` (a TermTracker) in place.

    Unless ``verbose``, the console shows only mace's training loop and each distinct warning once
    (``trainer_hooks.quiet_console``); mace's log files keep everything.
    """
    from mace.cli import run_train

    from protoalign_cli.mace.trainer_hooks import patched_mace, quiet_console

    with mace_process_state(mace_args), patched_mace(tracker), \
            (contextlib.nullcontext() if verbose else quiet_console()):
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
