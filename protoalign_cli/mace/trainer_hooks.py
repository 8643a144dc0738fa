"""Running mace_run_train with extra loss terms: wrappers around a few names in mace-torch.

Nothing of MACE is copied. For the duration of one run (``patched_mace``) we wrap:

- ``mace.cli.run_train.get_loss_fn`` and ``get_swa``: the loss (and stage two's loss) become
  ``AlignedLoss(base)``, i.e. ``base + Σ_t λ_t(epoch) · term_t`` (terms: ``protoalign_cli.terms``);
- ``mace.cli.run_train.configure_model``: captures the model being trained (its heads, element
  table, and whatever each term reads from it);
- ``mace.tools.train`` (the function) and, in module ``mace.tools.train``, ``train_one_epoch`` and
  ``evaluate``: tell the tracker the current epoch (so ``--restart_latest`` restores λ from MACE's
  own epoch counter) and attribute the terms' values to training or to a validation head, for the
  log and a JSONL file.

``quiet_console`` (the default of ``protoalign finetune``) also wraps ``mace.tools.setup_logger``, to
filter the console handler it makes. ``check_supported`` verifies every one of those names, and the
arguments the wrappers read, before anything runs. Per-atom targets reach the loss without an extra
forward pass: a ``ConfigurationIndex`` maps the exact bytes of (atomic numbers, positions in the
training dtype) of every target configuration to its rows among the target atoms; each graph of a
batch (split by ``ptr``) is looked up there. Configurations not in the index (e.g. multihead replay
data) and graphs of heads other than the target heads get weight 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.mace.models import PRETRAINING_HEAD
from protoalign_cli.terms.base import LossTerm, TermBatch, lambda_at_epoch

SUPPORTED_MACE_VERSION = "0.3.16"


@dataclasses.dataclass(frozen=True)
class MaceName:
    """A name protoalign finetune takes from mace-torch: ``attribute`` of ``module`` (dotted for a
    class member), and the ``parameters`` it must accept."""

    module: str
    attribute: str
    parameters: tuple[str, ...] = ()

    @property
    def dotted(self) -> str:
        """``module.attribute``."""
        return f"{self.module}.{self.attribute}"


MACE_NAMES = (
    MaceName("mace.cli.run_train", "main"),
    MaceName("mace.cli.run_train", "get_loss_fn"),
    MaceName("mace.cli.run_train", "get_swa"),
    MaceName("mace.cli.run_train", "configure_model"),
    MaceName("mace.tools", "train", ("start_epoch", "valid_loaders")),
    MaceName("mace.tools.train", "train_one_epoch", ("epoch",)),
    MaceName("mace.tools.train", "evaluate", ("data_loader",)),
    MaceName("mace.tools.train", "SWAContainer", ("loss_fn",)),
    MaceName("mace.modules.loss", "WeightedEnergyForcesLoss.forward", ("ref", "pred", "ddp")),
    MaceName("mace.tools", "build_default_arg_parser"),
    MaceName("mace.tools", "setup_logger", ("level", "tag", "directory")),
    MaceName("mace.tools", "AtomicNumberTable"),
    MaceName("mace.tools.scripts_utils", "check_path_ase_read"),
    MaceName("mace.tools.torch_tools", "default_dtype"),
    MaceName("mace.data", "HDF5Dataset", ("file_path", "r_max", "z_table")),
)


def _resolve(name: MaceName):
    """The object behind a MaceName, or None when a module or attribute is missing."""
    try:
        owner = importlib.import_module(name.module)
    except ImportError:
        return None
    for part in name.attribute.split("."):
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    return owner


def check_supported(names: Sequence[MaceName] = MACE_NAMES) -> None:
    """Raise a one-line ProtoalignError naming the first mace name or argument the hooks need but the
    installed mace-torch lacks (protoalign finetune supports mace-torch 0.3.16)."""
    from importlib.metadata import version

    for name in names:
        found = _resolve(name)
        missing = name.dotted if found is None else None
        if found is not None and name.parameters:
            accepted = inspect.signature(found).parameters
            absent = [p for p in name.parameters if p not in accepted]
            missing = f"argument {absent[0]!r} of {name.dotted}" if absent else None
        if missing is not None:
            raise ProtoalignError(f"mace-torch {version('mace-torch')} lacks {missing}, which protoalign finetune "
                                  f"hooks; protoalign supports mace-torch {SUPPORTED_MACE_VERSION}")


def configuration_key(atomic_numbers: np.ndarray, positions: np.ndarray, dtype: str) -> bytes:
    """The lookup key of a configuration: bytes of its atomic numbers (int64) and positions (Å) in ``dtype``."""
    numbers = np.ascontiguousarray(atomic_numbers, dtype=np.int64)
    coordinates = np.ascontiguousarray(positions, dtype=np.dtype(dtype))
    return numbers.tobytes() + coordinates.tobytes()


class ConfigurationIndex:
    """The first row of each target configuration among the target atoms, by configuration key."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self._starts: dict[bytes, int] = {}

    def add(self, atomic_numbers: np.ndarray, positions: np.ndarray, start: int) -> None:
        """Register a configuration (atomic numbers, positions in Å) whose atoms are rows ``start``, ... ."""
        self._starts[configuration_key(atomic_numbers, positions, self.dtype)] = int(start)

    def get(self, key: bytes) -> int | None:
        """The first row of the configuration with this key, or None."""
        return self._starts.get(key)

    def __len__(self) -> int:
        return len(self._starts)


def configuration_index(atomic_numbers: np.ndarray, positions: np.ndarray, config_offsets: np.ndarray,
                        dtype: str) -> ConfigurationIndex:
    """The index of every configuration delimited by ``config_offsets`` in per-atom arrays."""
    index = ConfigurationIndex(dtype)
    for start, stop in zip(config_offsets[:-1], config_offsets[1:]):
        index.add(atomic_numbers[start:stop], positions[start:stop], start)
    return index


class PhaseSums:
    """What one phase (training, or one validation head) accumulated: each term's sums, the graphs
    looked up and not found, and the wall time spent on the terms (this rank, s)."""

    def __init__(self, terms: Sequence[LossTerm]):
        self.term_sums = [dict.fromkeys(term.sum_names, 0.0) for term in terms]
        self.graphs = 0
        self.graphs_missing = 0
        self.seconds = 0.0

    def as_list(self) -> list[float]:
        """The sums as one flat row (the same layout on every rank, for the DDP reduction)."""
        values = [value for sums in self.term_sums for value in sums.values()]
        return values + [float(self.graphs), float(self.graphs_missing), self.seconds]

    def from_list(self, row: Sequence[float]) -> tuple[list[dict[str, float]], dict]:
        """The terms' sums and the lookup counts of a (reduced) row of ``as_list``."""
        values = iter(row)
        term_sums = [{name: next(values) for name in sums} for sums in self.term_sums]
        graphs, missing, seconds = values
        return term_sums, {"graphs": int(graphs), "graphs_missing": int(missing), "seconds": seconds}


class TermTracker:
    """State shared by the wrappers: the terms, the index, the epoch, the phase sums and the JSONL log.

    ``jsonl_path`` receives one line per start of training and one per epoch (and one for the
    evaluation before training): each term's λ and, per phase, its record and the lookup counts.
    """

    def __init__(self, terms: Sequence[LossTerm], index: ConfigurationIndex, jsonl_path: Path):
        for key in ("lambda_key", "settings_key", "log_name"):
            if len({getattr(term, key) for term in terms}) < len(terms):
                raise ValueError(f"two loss terms share their {key}; the JSONL records would mix them")
        self.terms = list(terms)
        self.index = index
        self.jsonl_path = Path(jsonl_path)
        self.epoch: int | None = None
        self.records: list[dict] = []
        self._atomic_numbers: np.ndarray | None = None
        self._target_heads: list[int] = []
        self._valid_names: dict[int, str] = {}
        self._phase: str | None = None
        self._sums: dict[str, PhaseSums] = {}
        self._pending: str | None = None  # 'initial' or 'epoch' while sums await flushing
        self._device = None
        self._last_ref = None

    def attach_model(self, model) -> None:
        """Read the element table and heads of the model MACE is about to train; let each term read it."""
        heads = list(getattr(model, "heads", None) or ["Default"])
        for term in self.terms:
            term.attach_model(model)
        self._atomic_numbers = np.asarray([int(z) for z in model.atomic_numbers], dtype=np.int64)
        self._target_heads = [i for i, head in enumerate(heads) if head != PRETRAINING_HEAD]
        logging.info(f"protoalign: aligning heads {[heads[i] for i in self._target_heads]} against {len(self.index)} "
                     f"target configurations; {self.describe()}")

    def describe(self) -> str:
        """The settings of every term, on one line."""
        return "; ".join(term.describe() for term in self.terms)

    def current_lambda(self, term: LossTerm) -> float:
        """λ of a term in the current epoch (0 before MACE has told us an epoch)."""
        return 0.0 if self.epoch is None else lambda_at_epoch(self.epoch, term.settings)

    def add_terms(self, loss, ref, pred, ddp):
        """Return ``loss + Σ λ_t · term_t`` for a batch; terms at λ = 0 are only recorded (no gradient)."""
        if self._atomic_numbers is None:
            raise RuntimeError("protoalign: the loss was called before the model was configured")
        started = time.perf_counter()
        phase_sums = self._sums.get(self._phase) if self._phase is not None else None
        # torchmetrics calls MACE's loss twice per validation batch: count each batch's values once.
        sums = phase_sums if ref is not self._last_ref else None
        self._last_ref = ref
        self._device = ref["positions"].device
        ddp = _ddp_enabled() if ddp is None else ddp
        rows, element_index, node_heads = self._lookup(ref, sums)
        for t, term in enumerate(self.terms):
            lam = self.current_lambda(term)
            batch = _term_batch(ref, pred, term, rows, element_index, node_heads, ddp)
            with contextlib.nullcontext() if lam > 0 else torch.no_grad():
                value = term.compute(batch)
            if lam > 0:
                loss = loss + (lam * value.term).to(loss.dtype)
            if sums is not None:
                for name in term.sum_names:
                    sums.term_sums[t][name] += float(value.sums[name])
        if phase_sums is not None:
            phase_sums.seconds += time.perf_counter() - started
        return loss

    def _lookup(self, ref, sums: PhaseSums | None):
        """Rows among the target atoms of a batch's atoms (-1: not looked up), their element and head indices."""
        element_index = ref["node_attrs"].argmax(dim=-1)
        device = element_index.device
        graph_heads = ref["head"] if "head" in ref else torch.zeros(ref.num_graphs, dtype=torch.long, device=device)
        ptr = ref["ptr"].cpu().numpy()
        positions = ref["positions"].detach().cpu().numpy()
        numbers = self._atomic_numbers[element_index.cpu().numpy()]
        heads = graph_heads.cpu().numpy()
        rows = np.full(len(numbers), -1, dtype=np.int64)
        for g in range(len(ptr) - 1):
            if int(heads[g]) not in self._target_heads:
                continue
            start, stop = ptr[g], ptr[g + 1]
            first = self.index.get(configuration_key(numbers[start:stop], positions[start:stop], self.index.dtype))
            if sums is not None:
                sums.graphs += 1
                sums.graphs_missing += first is None
            if first is not None:
                rows[start:stop] = np.arange(first, first + stop - start)
        return rows, element_index, graph_heads[ref["batch"]]

    def begin_training(self, start_epoch: int, valid_loaders: dict) -> None:
        """Called as MACE's ``train`` starts: the first epoch, and the names of the validation loaders."""
        self.epoch = start_epoch
        self._valid_names = {id(loader): name for name, loader in valid_loaders.items()}
        self._pending = "initial"
        settings = {term.settings_key: dataclasses.asdict(term.settings) for term in self.terms}
        self._append({"event": "start", "start_epoch": start_epoch, **settings})

    def begin_epoch(self, epoch: int) -> None:
        """Called as an epoch's training starts: flush the previous epoch, set λ for this one."""
        self.flush()
        self.epoch = epoch
        self._pending = "epoch"

    @contextlib.contextmanager
    def phase(self, name: str | None) -> Iterator[None]:
        """Attribute the terms of the loss calls inside the block to ``name`` ('train', 'valid:<head>')."""
        if name is not None:
            self._sums.setdefault(name, PhaseSums(self.terms))
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous
            self._last_ref = None

    def valid_phase_name(self, data_loader) -> str | None:
        """The phase name of a validation loader MACE's ``train`` was given, or None (e.g. final error tables)."""
        name = self._valid_names.get(id(data_loader))
        return None if name is None else f"valid:{name}"

    def flush(self) -> None:
        """Log and record the sums collected since the last flush (all ranks call this together)."""
        if self._pending is None:
            return
        names = sorted(self._sums)
        totals = self._reduce([self._sums[name].as_list() for name in names])
        record = {"epoch": self.epoch, "initial": self._pending == "initial"}
        record.update({term.lambda_key: self.current_lambda(term) for term in self.terms})
        missing = 0
        for name, row in zip(names, totals):
            term_sums, counts = self._sums[name].from_list(row)
            values = {key: value for term, sums in zip(self.terms, term_sums) for key, value in term.summarize(sums).items()}
            values.update(counts)
            missing += counts["graphs_missing"]
            if name == "train":
                record["train"] = values
            else:
                record.setdefault("valid", {})[name.split(":", 1)[1]] = values
        self._sums = {}
        self._pending = None
        if not _is_rank_zero():
            return
        self.records.append(record)
        self._append(record)
        logging.info(self.log_line(record))
        if missing:
            logging.warning(f"protoalign: {missing} target-head graphs were not found in the alignment table "
                            "(their positions differ from the files read before training); they got weight 0")

    def log_line(self, record: dict) -> str:
        """The log line of an epoch record: each term's λ, then its value per phase."""
        epoch = "initial" if record["initial"] else record["epoch"]
        parts = [f"protoalign epoch {epoch}:"]
        parts += [f"{term.lambda_key}={record[term.lambda_key]:.4g}" for term in self.terms]
        phases = [("train", "", record["train"])] if "train" in record else []
        phases += [("valid", f"[{head}]", values) for head, values in record.get("valid", {}).items()]
        for phase, head, values in phases:
            parts += [f"{phase}_{term.log_name}{head}={term.format_value(values)}" for term in self.terms]
        return " ".join(parts)

    def _reduce(self, rows: list[list[float]]) -> list[list[float]]:
        if not rows or not _ddp_enabled():
            return rows
        tensor = torch.tensor(rows, dtype=torch.float64, device=self._device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().tolist()

    def _append(self, record: dict) -> None:
        if not _is_rank_zero():
            return
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _term_batch(ref, pred, term: LossTerm, rows, element_index, node_heads, ddp: bool) -> TermBatch:
    """The term's per-atom targets and weights gathered for a batch (zeros where ``rows`` is -1)."""
    found = rows >= 0
    safe = np.where(found, rows, 0)
    target = np.where(found[:, None], term.targets.target[safe], 0.0)
    weight = np.where(found, term.targets.weight[safe], 0.0)
    device = element_index.device
    return TermBatch(ref=ref, pred=pred, element_index=element_index, node_heads=node_heads,
                     target=torch.from_numpy(target).to(device), weight=torch.from_numpy(weight).to(device), ddp=ddp)


def _ddp_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class AlignedLoss(torch.nn.Module):
    """MACE's loss plus λ_t(epoch) times each term of the tracker: ``base + Σ λ_t · term_t``."""

    def __init__(self, base_loss: torch.nn.Module, tracker: TermTracker):
        super().__init__()
        self.base_loss = base_loss
        self.tracker = tracker

    def forward(self, ref, pred, ddp=None):
        """``base_loss(ref, pred, ddp) + Σ λ_t · term_t``; MACE calls it as ``loss_fn(pred=..., ref=...)``."""
        loss = self.base_loss(ref=ref, pred=pred, ddp=ddp)
        return self.tracker.add_terms(loss, ref, pred, ddp)

    def __repr__(self) -> str:
        return f"AlignedLoss({self.base_loss!r}; protoalign {self.tracker.describe()})"


def _argument(function, name: str, args: tuple, kwargs: dict):
    return inspect.signature(function).bind(*args, **kwargs).arguments[name]


@contextlib.contextmanager
def _replaced(owner, name: str, replacement) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def patched_mace(tracker: TermTracker) -> Iterator[None]:
    """Within the block, mace_run_train trains with the terms of ``tracker``; undone afterwards.

    Call ``check_supported`` first: it verifies every name bound here.
    """
    import mace.tools
    from mace.cli import run_train

    train_module = importlib.import_module("mace.tools.train")
    get_loss_fn, get_swa, configure_model = run_train.get_loss_fn, run_train.get_swa, run_train.configure_model
    train, train_one_epoch, evaluate = mace.tools.train, train_module.train_one_epoch, train_module.evaluate

    def get_loss_fn_aligned(*args, **kwargs):
        return AlignedLoss(get_loss_fn(*args, **kwargs), tracker)

    def get_swa_aligned(*args, **kwargs):
        swa, swas = get_swa(*args, **kwargs)
        swa.loss_fn = AlignedLoss(swa.loss_fn, tracker)
        return swa, swas

    def configure_model_capturing(*args, **kwargs):
        model, output_args = configure_model(*args, **kwargs)
        tracker.attach_model(model)
        return model, output_args

    def train_tracking(*args, **kwargs):
        tracker.begin_training(_argument(train, "start_epoch", args, kwargs),
                               _argument(train, "valid_loaders", args, kwargs))
        try:
            return train(*args, **kwargs)
        finally:
            tracker.flush()

    def train_one_epoch_tracking(*args, **kwargs):
        tracker.begin_epoch(_argument(train_one_epoch, "epoch", args, kwargs))
        with tracker.phase("train"):
            return train_one_epoch(*args, **kwargs)

    def evaluate_tracking(*args, **kwargs):
        with tracker.phase(tracker.valid_phase_name(_argument(evaluate, "data_loader", args, kwargs))):
            return evaluate(*args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_replaced(run_train, "get_loss_fn", get_loss_fn_aligned))
        stack.enter_context(_replaced(run_train, "get_swa", get_swa_aligned))
        stack.enter_context(_replaced(run_train, "configure_model", configure_model_capturing))
        stack.enter_context(_replaced(mace.tools, "train", train_tracking))
        stack.enter_context(_replaced(train_module, "train_one_epoch", train_one_epoch_tracking))
        stack.enter_context(_replaced(train_module, "evaluate", evaluate_tracking))
        yield


def shown_on_quiet_console(record: logging.LogRecord) -> bool:
    """Whether the quiet console shows a log record: warnings and errors, mace's training loop
    (``mace.tools.train``: the per-epoch errors), protoalign's own lines and the final error tables."""
    training_loop = sys.modules["mace.tools.train"].__file__
    return (record.levelno >= logging.WARNING or record.pathname in (training_loop, __file__)
            or str(record.msg).startswith("Error-table"))


@contextlib.contextmanager
def quiet_console() -> Iterator[None]:
    """Within the block, mace_run_train's console shows only what ``shown_on_quiet_console`` keeps (its
    log files keep everything), and each distinct Python warning is shown once, on one line."""
    import mace.tools

    setup_logger, show = mace.tools.setup_logger, warnings.showwarning
    shown: set[tuple[type, str]] = set()  # (category, message) of the warnings shown

    def setup_logger_quiet(*args, **kwargs):
        root = logging.getLogger()
        before = list(root.handlers)
        setup_logger(*args, **kwargs)
        for handler in root.handlers:
            if handler not in before and type(handler) is logging.StreamHandler:  # the console, not a file
                handler.addFilter(shown_on_quiet_console)

    def show_once(message, category, filename, lineno, file=None, line=None):
        if (category, str(message)) not in shown:
            shown.add((category, str(message)))
            show(message, category, filename, lineno, file, line="")

    with warnings.catch_warnings(), _replaced(mace.tools, "setup_logger", setup_logger_quiet):
        warnings.showwarning = show_once
        yield
