"""The interface of a loss term added to MACE's loss during ``protoalign finetune``.

A term is built once, before training, from the target atoms (every atom of the training and
validation files, with its nearest prototype in the pretrained latent space) and the prototypes:
it precomputes per-atom ``AtomTargets`` (a target vector of any width and a weight >= 0 per
target atom). During training the generic tracker of ``protoalign_cli.mace.trainer_hooks`` looks
up each graph of a batch by its exact bytes, gathers the rows of the batch's atoms (graphs not
found, or of heads that are not trained, get weight 0) and calls ``LossTerm.compute`` with a
``TermBatch``: MACE's batch ``ref``, the model output ``pred`` (``node_energy``, ``node_feats``, ...)
and the gathered targets and weights. The term returns a ``TermValue``: the scalar torch term and
its additive sums (named in ``sum_names``); the tracker adds λ(epoch)·term to the loss (nothing at
λ = 0), sums the values per phase (training, each validation head), all-reduces them under DDP and
writes them through the term's ``summarize`` and ``format_value``.

The λ schedule (``ScheduleSettings``, ``lambda_at_epoch``) is shared by every term.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from protoalign_cli.errors import ProtoalignError

if TYPE_CHECKING:
    from protoalign_cli.terms.target_atoms import TargetAtoms

DECAYS = ("none", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class ScheduleSettings:
    """λ(epoch) of a term: ``weight`` λ (dimensionless, >= 0); a linear warmup from 0 at epoch 0 to λ
    at epoch ``warmup_epochs``; then ``decay`` ('none', 'linear' or 'cosine' to 0) over ``decay_epochs``."""

    weight: float = 0.0
    warmup_epochs: int = 0
    decay: str = "none"
    decay_epochs: int | None = None


def check_schedule(settings: ScheduleSettings, option_prefix: str) -> None:
    """Raise ProtoalignError for an impossible schedule; messages name ``<option_prefix>-weight`` etc."""
    if not settings.weight >= 0 or not np.isfinite(settings.weight):
        raise ProtoalignError(f"{option_prefix}-weight must be a finite number >= 0, got {settings.weight}")
    if settings.warmup_epochs < 0:
        raise ProtoalignError(f"{option_prefix}-warmup-epochs must be >= 0, got {settings.warmup_epochs}")
    if settings.decay not in DECAYS:
        raise ProtoalignError(f"{option_prefix}-decay must be one of {', '.join(DECAYS)}")
    if settings.decay_epochs is not None and settings.decay_epochs < 1:
        raise ProtoalignError(f"{option_prefix}-decay-epochs must be >= 1, got {settings.decay_epochs}")


def with_decay_epochs(settings: ScheduleSettings, max_num_epochs: int) -> ScheduleSettings:
    """The settings with ``decay_epochs`` defaulted to the epochs left after the warmup (at least 1)."""
    if settings.decay == "none" or settings.decay_epochs is not None:
        return settings
    return dataclasses.replace(settings, decay_epochs=max(1, max_num_epochs - settings.warmup_epochs))


def lambda_at_epoch(epoch: int, settings: ScheduleSettings) -> float:
    """λ at a (0-based) epoch: linear warmup over ``warmup_epochs``, then the chosen decay."""
    factor = 1.0
    warmup = settings.warmup_epochs
    if warmup > 0 and epoch < warmup:
        factor = epoch / warmup
    if settings.decay != "none":
        progress = min(1.0, max(0.0, (epoch - warmup) / settings.decay_epochs))
        if settings.decay == "linear":
            factor *= 1.0 - progress
        else:
            factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.weight * factor


@dataclasses.dataclass(frozen=True)
class TermOption:
    """A command-line option of a term, declared without click: ``<option_prefix>-<field with dashes>``
    sets the settings' ``field``; ``kind`` is float, int or str (``choices`` for a str); ``help`` its text."""

    field: str
    kind: type
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


def schedule_options() -> tuple[TermOption, ...]:
    """The options of the λ schedule every term has (after its ``weight``)."""
    return (
        TermOption("warmup_epochs", int, "λ rises linearly from 0 (epoch 0) to its full value at this epoch."),
        TermOption("decay", str, "Decay of λ to 0 after the warmup.", choices=DECAYS),
        TermOption("decay_epochs", int, "Epochs over which λ decays [default: mace's --max_num_epochs minus the warmup]."),
    )


@dataclasses.dataclass(frozen=True)
class AtomTargets:
    """What a term precomputed per target atom: ``target`` [n, width] and ``weight`` [n] >= 0."""

    target: np.ndarray
    weight: np.ndarray


@dataclasses.dataclass
class TermBatch:
    """One loss call as a term sees it (torch tensors on the batch's device).

    ``ref``: MACE's batch; ``pred``: the model output; ``element_index`` [n_atoms]: index of each atom's
    element in the trained model's table; ``node_heads`` [n_atoms]: its head index; ``target``
    [n_atoms, width] and ``weight`` [n_atoms] (float64): the term's ``AtomTargets`` rows of the batch's
    atoms (zeros for atoms not looked up); ``ddp``: whether the loss is reduced over ranks.
    """

    ref: Any
    pred: dict
    element_index: Any
    node_heads: Any
    target: Any
    weight: Any
    ddp: bool


@dataclasses.dataclass
class TermValue:
    """A term's value on one batch: ``term`` (scalar torch tensor, attached to the graph) and its
    additive, detached ``sums`` by the names of the term's ``sum_names`` (summed over batches and ranks)."""

    term: Any
    sums: dict[str, Any]


class LossTerm(abc.ABC):
    """A loss term: built from the target atoms before training, computed on every loss call.

    Its settings are a ``ScheduleSettings`` subclass (``settings_class``) holding the term's own
    options. Class attributes: ``name`` (its registry name), ``option_prefix`` and ``options`` (its
    command-line options, which the CLI builds from them), ``on_by_default`` (used unless the user
    sets none of its options), ``sum_names`` (the additive sums of ``TermValue``), ``lambda_key`` /
    ``settings_key`` (their keys in the JSONL records) and ``log_name`` (the log label:
    ``train_<log_name>=``).
    """

    name: ClassVar[str]
    settings_class: ClassVar[type[ScheduleSettings]]
    option_prefix: ClassVar[str]
    options: ClassVar[tuple[TermOption, ...]]
    on_by_default: ClassVar[bool] = False
    sum_names: ClassVar[tuple[str, ...]]
    lambda_key: ClassVar[str]
    settings_key: ClassVar[str]
    log_name: ClassVar[str]

    def __init__(self, settings: ScheduleSettings, targets: AtomTargets):
        self.settings = settings
        self.targets = targets

    @classmethod
    def check_settings(cls, settings: ScheduleSettings) -> None:
        """Raise ProtoalignError for impossible settings (the schedule's; subclasses add their own)."""
        check_schedule(settings, cls.option_prefix)

    @classmethod
    def needs_pretrained_latents(cls, settings: ScheduleSettings) -> bool:
        """Whether ``build`` reads the target atoms' pretrained latent rows (``TargetAtoms.latent``)."""
        return False

    @classmethod
    @abc.abstractmethod
    def build(cls, settings: ScheduleSettings, atoms: TargetAtoms, prototypes) -> "LossTerm":
        """The term with its per-atom targets and weights for ``atoms`` (rows in the same order)."""

    def attach_model(self, model) -> None:
        """Read what the term needs from the model MACE is about to train (before the first loss call)."""

    @abc.abstractmethod
    def compute(self, batch: TermBatch) -> TermValue:
        """The term (torch scalar) and its sums on one batch; the caller sets the gradient mode."""

    @abc.abstractmethod
    def summarize(self, sums: dict[str, float]) -> dict:
        """The record of one phase (JSON-ready) from the sums over its batches and ranks."""

    @abc.abstractmethod
    def format_value(self, record: dict) -> str:
        """One log value of a phase record, e.g. '7.6e-03 eV^2 (87.4 meV rms)'."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line with the term's settings, for the log."""


def reduce_weighted_mean(weighted_sum, weight_sum, ddp: bool):
    """Σ w x / Σ w over this batch, or over all ranks like mace's ``reduce_loss`` under DDP (torch).

    Under DDP the weight sum is all-reduced (without gradient) and the local Σ w x is scaled by the
    world size, so that DDP's gradient averaging yields the gradient of the global weighted mean.
    A zero total weight gives 0 (still attached to the graph).
    """
    import torch
    import torch.distributed as dist

    total_weight = weight_sum.detach().clone()
    world_size = 1
    if ddp:
        dist.all_reduce(total_weight, op=dist.ReduceOp.SUM)
        world_size = dist.get_world_size()
    total_weight = total_weight.to(weighted_sum.dtype)
    safe_total = torch.where(total_weight > 0, total_weight, torch.ones_like(total_weight))
    return torch.where(total_weight > 0, weighted_sum * world_size / safe_total, weighted_sum * 0.0)


class WeightedMeanTerm(LossTerm):
    """A term that is a weighted mean over the target atoms, Σ_i w_i x_i / Σ_i w_i: its sums, its record (the mean
    under ``record_key``, None without weight, and Σ w under 'weight') and its log value (``format_mean``)."""

    sum_names = ("weighted_square_sum", "weight_sum")
    record_key: ClassVar[str]

    @staticmethod
    def weighted_value(per_atom, weight, ddp: bool) -> TermValue:
        """The term Σ w x / Σ w of per-atom values ``per_atom`` (reduced over ranks under DDP) and its sums (torch)."""
        weighted_square_sum = (weight * per_atom).sum()
        weight_sum = weight.sum()
        term = reduce_weighted_mean(weighted_square_sum, weight_sum, ddp)
        return TermValue(term, {"weighted_square_sum": weighted_square_sum.detach(), "weight_sum": weight_sum.detach()})

    def summarize(self, sums: dict[str, float]) -> dict:
        """The weighted mean (None without weight) under ``record_key``, and Σ w under 'weight'."""
        weight_sum = sums["weight_sum"]
        return {self.record_key: sums["weighted_square_sum"] / weight_sum if weight_sum > 0 else None,
                "weight": weight_sum}

    def format_value(self, record: dict) -> str:
        """``format_mean`` of the phase's mean, or 'n/a' without weighted atoms."""
        value = record[self.record_key]
        return "n/a (no weighted atoms)" if value is None else self.format_mean(value)

    @abc.abstractmethod
    def format_mean(self, value: float) -> str:
        """One log value of a weighted mean, with its unit."""


def schedule_description(settings: ScheduleSettings) -> str:
    """'lambda=…, warmup_epochs=…[, decay=… over … epochs]' for a term's log line."""
    decay = "" if settings.decay == "none" else f", decay={settings.decay} over {settings.decay_epochs} epochs"
    return f"lambda={settings.weight}, warmup_epochs={settings.warmup_epochs}{decay}"
