"""Running mace_run_train with the alignment term: wrappers around a few names in mace-torch.

Nothing of MACE is copied. For the duration of one run (``patched_mace``) we wrap:

- ``mace.cli.run_train.get_loss_fn`` and ``get_swa``: the loss (and stage two's loss) become
  ``AlignedLoss(base)``, i.e. ``base + λ(epoch) · term`` (see ``protoalign_cli.alignment``);
- ``mace.cli.run_train.configure_model``: captures the model being trained (its E0 buffer,
  element table and heads);
- ``mace.tools.train`` (the function) and, in module ``mace.tools.train``, ``train_one_epoch`` and
  ``evaluate``: tell the term the current epoch (so ``--restart_latest`` restores λ from MACE's
  own epoch counter) and attribute its values to training or to a validation head, for the log
  and a JSONL file.

Per-atom targets reach the loss without an extra forward pass: an ``AlignmentTable`` maps the
exact bytes of (atomic numbers, positions in the training dtype) of every target configuration to
its per-atom (ε* in eV, weight); each graph of a batch (split by ``ptr``) is looked up there.
Configurations not in the table (e.g. multihead replay data) and graphs of heads other than the
target heads get weight 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Iterator

import mace.tools  # (imports mace before e3nn)
import numpy as np
import torch
import torch.distributed as dist

from protoalign_cli import alignment
from protoalign_cli.errors import ProtoalignError

PRETRAINING_HEAD = "pt_head"


def configuration_key(atomic_numbers: np.ndarray, positions: np.ndarray, dtype: str) -> bytes:
    """The lookup key of a configuration: bytes of its atomic numbers (int64) and positions (Å) in ``dtype``."""
    numbers = np.ascontiguousarray(atomic_numbers, dtype=np.int64)
    coordinates = np.ascontiguousarray(positions, dtype=np.dtype(dtype))
    return numbers.tobytes() + coordinates.tobytes()


class AlignmentTable:
    """Per-atom alignment targets ε* (eV) and weights of the target configurations, by configuration key."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self._entries: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, atomic_numbers: np.ndarray, positions: np.ndarray, target: np.ndarray, weight: np.ndarray) -> None:
        """Store one configuration's per-atom targets (eV) and weights."""
        key = configuration_key(atomic_numbers, positions, self.dtype)
        self._entries[key] = (np.asarray(target, dtype=np.float64), np.asarray(weight, dtype=np.float64))

    def get(self, key: bytes) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-atom (targets, weights) of the configuration with this key, or None."""
        return self._entries.get(key)

    def __len__(self) -> int:
        return len(self._entries)


class _Sums:
    """Running Σ w r² (eV²), Σ w and graph counts of one phase (training or one validation head)."""

    def __init__(self):
        self.weighted_square_sum = 0.0
        self.weight_sum = 0.0
        self.graphs = 0
        self.graphs_missing = 0
        self.seconds = 0.0  # wall time spent on the term (lookup + math), this rank

    def as_list(self) -> list[float]:
        return [self.weighted_square_sum, self.weight_sum, float(self.graphs), float(self.graphs_missing), self.seconds]

    def mean(self) -> float | None:
        return self.weighted_square_sum / self.weight_sum if self.weight_sum > 0 else None


class AlignmentTracker:
    """State shared by the wrappers: the table, the settings, the trained model's E0s, epoch and sums.

    ``jsonl_path`` receives one JSON line per epoch (and one for the evaluation before training):
    λ, the term on training and on each validation head, and the weights behind them.
    """

    def __init__(self, table: AlignmentTable, settings: alignment.AlignmentSettings, jsonl_path: Path):
        self.table = table
        self.settings = settings
        self.jsonl_path = Path(jsonl_path)
        self.epoch: int | None = None
        self.records: list[dict] = []
        self._atomic_numbers: np.ndarray | None = None
        self._e0_table = None  # torch [n_heads, n_elements], eV, float64
        self._target_heads: list[int] = []
        self._valid_names: dict[int, str] = {}
        self._phase: str | None = None
        self._sums: dict[str, _Sums] = {}
        self._pending: str | None = None  # 'initial' or 'epoch' while sums await flushing
        self._device = None
        self._last_ref = None

    # --- the model being trained -------------------------------------------------------------
    def attach_model(self, model) -> None:
        """Read E0s (eV), element table and heads from the model MACE is about to train."""
        if not hasattr(model, "atomic_energies_fn"):
            raise ProtoalignError(f"{type(model).__name__} has no atomic energies; "
                                  "the alignment term needs an energy model")
        heads = list(getattr(model, "heads", None) or ["Default"])
        e0 = model.atomic_energies_fn.atomic_energies.detach().to(device="cpu", dtype=torch.float64)
        self._e0_table = e0.reshape(len(heads), -1)
        self._atomic_numbers = np.asarray([int(z) for z in model.atomic_numbers], dtype=np.int64)
        self._target_heads = [i for i, head in enumerate(heads) if head != PRETRAINING_HEAD]
        logging.info(f"protoalign: aligning heads {[heads[i] for i in self._target_heads]} against {len(self.table)} "
                     f"target configurations; {self.describe()}")

    def describe(self) -> str:
        """One line with the settings of the term."""
        s = self.settings
        decay = "" if s.decay == "none" else f", decay={s.decay} over {s.decay_epochs} epochs"
        spread = "" if s.spread_scale is None else f", spread_scale={s.spread_scale} eV"
        return (f"lambda={s.weight}, warmup_epochs={s.warmup_epochs}{decay}, weighting={s.weighting}, "
                f"cutoff={s.cutoff}x radius{spread}, reference={s.reference}")

    # --- the term ----------------------------------------------------------------------------
    def current_lambda(self) -> float:
        """λ of the current epoch (0 before MACE has told us an epoch)."""
        return 0.0 if self.epoch is None else alignment.lambda_at_epoch(self.epoch, self.settings)

    def add_term(self, loss, ref, pred, ddp):
        """Return ``loss + λ · term`` for a batch; with λ = 0 return ``loss`` itself (term only recorded)."""
        if self._e0_table is None:
            raise RuntimeError("protoalign: the loss was called before the model was configured")
        started = time.perf_counter()
        ddp = _ddp_enabled() if ddp is None else ddp
        lam = self.current_lambda()
        phase_sums = self._sums.get(self._phase) if self._phase is not None else None
        # torchmetrics calls MACE's loss twice per validation batch: count each batch's values once.
        sums = phase_sums if ref is not self._last_ref else None
        self._last_ref = ref
        with contextlib.nullcontext() if lam > 0 else torch.no_grad():
            term, weighted_square_sum, weight_sum = self._term(ref, pred, ddp, sums)
        if lam > 0:
            loss = loss + (lam * term).to(loss.dtype)
        if sums is not None:
            sums.weighted_square_sum += float(weighted_square_sum)
            sums.weight_sum += float(weight_sum)
        if phase_sums is not None:
            phase_sums.seconds += time.perf_counter() - started
        return loss

    def _term(self, ref, pred, ddp, sums: _Sums | None):
        device = ref["positions"].device
        self._device = device
        element_index = ref["node_attrs"].argmax(dim=-1)
        graph_heads = ref["head"] if "head" in ref else torch.zeros(ref.num_graphs, dtype=torch.long, device=device)
        node_heads = graph_heads[ref["batch"]]
        target, weight = self._lookup(ref["ptr"], ref["positions"], element_index, graph_heads, sums)
        target = torch.from_numpy(target).to(device)
        weight = torch.from_numpy(weight).to(device)
        e0 = self._e0_table.to(device)[node_heads, element_index]
        energy_minus_e0 = pred["node_energy"].to(torch.float64) - e0
        return alignment.alignment_term(
            energy_minus_e0, target, weight, element_index, self._e0_table.shape[1], self.settings.reference, ddp
        )

    def _lookup(self, ptr, positions, element_index, graph_heads, sums: _Sums | None) -> tuple[np.ndarray, np.ndarray]:
        """Per-atom targets and weights of a batch; graphs of other heads or not in the table get weight 0."""
        ptr = ptr.cpu().numpy()
        positions = positions.detach().cpu().numpy()
        numbers = self._atomic_numbers[element_index.cpu().numpy()]
        graph_heads = graph_heads.cpu().numpy()
        target = np.zeros(len(numbers))
        weight = np.zeros(len(numbers))
        for g in range(len(ptr) - 1):
            if int(graph_heads[g]) not in self._target_heads:
                continue
            start, stop = ptr[g], ptr[g + 1]
            entry = self.table.get(configuration_key(numbers[start:stop], positions[start:stop], self.table.dtype))
            if sums is not None:
                sums.graphs += 1
                sums.graphs_missing += entry is None
            if entry is not None:
                target[start:stop], weight[start:stop] = entry
        return target, weight

    # --- epochs and phases -------------------------------------------------------------------
    def begin_training(self, start_epoch: int, valid_loaders: dict) -> None:
        """Called as MACE's ``train`` starts: the first epoch, and the names of the validation loaders."""
        self.epoch = start_epoch
        self._valid_names = {id(loader): name for name, loader in valid_loaders.items()}
        self._pending = "initial"
        self._append({"event": "start", "start_epoch": start_epoch, "settings": dataclasses.asdict(self.settings)})

    def begin_epoch(self, epoch: int) -> None:
        """Called as an epoch's training starts: flush the previous epoch, set λ for this one."""
        self.flush()
        self.epoch = epoch
        self._pending = "epoch"

    @contextlib.contextmanager
    def phase(self, name: str | None) -> Iterator[None]:
        """Attribute the term of the loss calls inside the block to ``name`` ('train', 'valid:<head>')."""
        if name is not None:
            self._sums.setdefault(name, _Sums())
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
        record = {"epoch": self.epoch, "initial": self._pending == "initial", "lambda": self.current_lambda()}
        for name, (square_sum, weight_sum, graphs, missing, seconds) in zip(names, totals):
            values = {"align": square_sum / weight_sum if weight_sum > 0 else None, "weight": weight_sum,
                      "graphs": int(graphs), "graphs_missing": int(missing), "seconds": seconds}
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
        logging.info(_log_line(record))
        missing = sum(int(t[3]) for t in totals)
        if missing:
            logging.warning(f"protoalign: {missing} target-head graphs were not found in the alignment table "
                            "(their positions differ from the files read before training); they got weight 0")

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


def _log_line(record: dict) -> str:
    epoch = "initial" if record["initial"] else record["epoch"]
    parts = [f"protoalign epoch {epoch}: lambda={record['lambda']:.4g}"]
    labelled = [("train_align", record["train"])] if "train" in record else []
    labelled += [(f"valid_align[{head}]", values) for head, values in record.get("valid", {}).items()]
    for label, values in labelled:
        value = values["align"]
        if value is None:
            parts.append(f"{label}=n/a (no weighted atoms)")
        else:
            parts.append(f"{label}={value:.4e} eV^2 ({1e3 * math.sqrt(value):.1f} meV rms)")
    return " ".join(parts)


def _ddp_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class AlignedLoss(torch.nn.Module):
    """MACE's loss plus λ(epoch) times the prototype alignment term (see protoalign_cli.alignment)."""

    def __init__(self, base_loss: torch.nn.Module, tracker: AlignmentTracker):
        super().__init__()
        self.base_loss = base_loss
        self.tracker = tracker

    def forward(self, ref, pred, ddp=None):
        """``base_loss(ref, pred, ddp) + λ · term``; MACE calls it as ``loss_fn(pred=..., ref=...)``."""
        loss = self.base_loss(ref=ref, pred=pred, ddp=ddp)
        return self.tracker.add_term(loss, ref, pred, ddp)

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
def patched_mace(tracker: AlignmentTracker) -> Iterator[None]:
    """Within the block, mace_run_train trains with the alignment term of ``tracker``; undone afterwards."""
    from mace.cli import run_train

    train_module = sys.modules["mace.tools.train"]
    get_loss_fn = run_train.get_loss_fn
    get_swa = run_train.get_swa
    configure_model = run_train.configure_model
    train = mace.tools.train
    train_one_epoch = train_module.train_one_epoch
    evaluate = train_module.evaluate

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
