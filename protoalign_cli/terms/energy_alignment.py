"""The prototype energy alignment term: its per-atom targets and weights, the term, and its ``LossTerm``.

For target-training atoms i with energy-minus-E0 ε_i (eV) in the model being trained, the
nearest prototype p(i) in the pretrained latent space, its mean energy ε*_p (eV) and a weight
w_i >= 0, the term added to MACE's loss is

    λ(epoch) · Σ_i w_i r_i² / Σ_i w_i        (eV²),   r_i = ε_i − ε*_p(i)

('absolute'), or with r_i replaced by r_i minus the weighted batch mean of r over the atoms of
the same element ('centered': only the within-element variation of the per-atom partition is
aligned, so a per-element offset between levels of theory costs nothing).

Weights (computed once, numpy; ``protoalign_cli.terms.weighting``) fall with the distance d_i to the
prototype in units of its radius times ``cutoff``, and optionally with its members' energy spread.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.terms.base import (
    AtomTargets,
    ScheduleSettings,
    TermBatch,
    TermOption,
    TermValue,
    WeightedMeanTerm,
    schedule_description,
    schedule_options,
)
from protoalign_cli.terms.target_atoms import TargetAtoms
from protoalign_cli.terms.weighting import (
    check_weighting,
    prototype_weights,
    weighting_description,
    weighting_options,
)

REFERENCES = ("centered", "absolute")
DEFAULT_WEIGHT = 0.01  # inert in every bench of docs/results.md; no λ there beat plain fine-tuning


@dataclasses.dataclass(frozen=True)
class AlignmentSettings(ScheduleSettings):
    """The options of the energy alignment term (see the module docstring for their meaning).

    Besides the λ schedule (``weight`` λ on a term in eV², warmup, decay): ``weighting`` 'gaussian'
    or 'hard'; ``cutoff`` multiplies the prototype radius; ``spread_scale`` (eV) or None;
    ``reference`` 'centered' or 'absolute'.
    """

    weight: float = DEFAULT_WEIGHT
    weighting: str = "gaussian"
    cutoff: float = 1.0
    spread_scale: float | None = None
    reference: str = "centered"


def atom_targets_and_weights(prototype_id: np.ndarray, distance: np.ndarray, radius: np.ndarray,
                             energy_mean: np.ndarray, energy_std: np.ndarray,
                             settings: AlignmentSettings) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom target ε* (eV) and weight w from assignments to prototypes (global ids, -1 = none).

    Atoms without a prototype get target 0 and weight 0. Per-prototype arrays are indexed by id.
    """
    prototype_id = np.asarray(prototype_id, dtype=np.int64)
    assigned = prototype_id >= 0
    target = np.where(assigned, np.asarray(energy_mean, dtype=np.float64)[np.where(assigned, prototype_id, 0)], 0.0)
    weight = prototype_weights(prototype_id, distance, radius, energy_std, settings.weighting, settings.cutoff,
                               settings.spread_scale)
    return target, weight


def centered_residual(residual, weight, element_index, n_elements: int):
    """Subtract, per element, the weighted mean of the residual (eV) over the given atoms (torch).

    Elements whose weights sum to 0 are left unchanged (their atoms carry no weight anyway).
    """
    import torch

    weighted_sum = torch.zeros(n_elements, dtype=residual.dtype, device=residual.device)
    weighted_sum = weighted_sum.index_add(0, element_index, weight * residual)
    weight_sum = torch.zeros(n_elements, dtype=weight.dtype, device=weight.device).index_add(0, element_index, weight)
    mean = torch.where(weight_sum > 0, weighted_sum / weight_sum.clamp_min(torch.finfo(weight.dtype).tiny), 0.0)
    return residual - mean[element_index]


def alignment_residual(energy_minus_e0, target, weight, element_index, n_elements: int, reference: str):
    """Per-atom residual ε − ε* (eV), centered per element when ``reference`` is 'centered' (torch)."""
    residual = energy_minus_e0 - target
    if reference == "centered":
        return centered_residual(residual, weight, element_index, n_elements)
    return residual


def alignment_term(energy_minus_e0, target, weight, element_index, n_elements: int, reference: str, ddp: bool):
    """The weighted mean squared residual (eV²) and its parts (Σ w r², Σ w, both detached) of one batch."""
    residual = alignment_residual(energy_minus_e0, target, weight, element_index, n_elements, reference)
    value = WeightedMeanTerm.weighted_value(residual.square(), weight, ddp)
    return value.term, value.sums["weighted_square_sum"], value.sums["weight_sum"]


class EnergyAlignmentTerm(WeightedMeanTerm):
    """Pulls each target atom's energy minus E0 in the trained model toward its prototype's mean (eV²)."""

    name = "energy_alignment"
    settings_class = AlignmentSettings
    option_prefix = "--align"
    record_key = "align"
    options = (
        TermOption("weight", float, "λ (dimensionless): weight of the alignment term, a mean squared per-atom energy "
                                    "residual in eV², added to MACE's loss; 0 trains exactly as plain MACE. The default "
                                    "is harmless, not helpful: on the benchmarks in docs/results.md no λ beat plain "
                                    "fine-tuning. Choose it on your validation set with `protoalign bench`.",
                   metavar="LAMBDA"),
        TermOption("reference", str, "centered: align each atom's energy relative to the mean of its element in the "
                                     "batch (insensitive to per-element offsets between levels of theory); absolute: "
                                     "align the energy itself.", choices=REFERENCES),
        *weighting_options(),
        *schedule_options(),
    )
    on_by_default = True
    lambda_key = "lambda"
    settings_key = "settings"
    log_name = "align"

    def __init__(self, settings: AlignmentSettings, targets: AtomTargets):
        super().__init__(settings, targets)
        self._e0_table = None  # torch [n_heads, n_elements], eV, float64

    @classmethod
    def check_settings(cls, settings: AlignmentSettings) -> None:
        """The schedule's checks, then the weighting's."""
        super().check_settings(settings)
        check_weighting(settings.weighting, settings.cutoff, settings.spread_scale, cls.option_prefix)
        if settings.reference not in REFERENCES:
            raise ProtoalignError(f"--align-reference must be one of {', '.join(REFERENCES)}")

    @classmethod
    def build(cls, settings: AlignmentSettings, atoms: TargetAtoms, prototypes) -> "EnergyAlignmentTerm":
        """Targets ε*: the assigned prototypes' ``energy_mean`` (eV); weights from distance and spread."""
        target, weight = atom_targets_and_weights(
            atoms.assignment.prototype_id, atoms.assignment.distance, prototypes.radius,
            prototypes.energy_mean, prototypes.energy_std, settings,
        )
        return cls(settings, AtomTargets(target[:, None], weight))

    def attach_model(self, model) -> None:
        """Read the E0s (eV, per head and element) of the model being trained."""
        import torch

        if not hasattr(model, "atomic_energies_fn"):
            raise ProtoalignError(f"{type(model).__name__} has no atomic energies; "
                                  "the alignment term needs an energy model")
        heads = list(getattr(model, "heads", None) or ["Default"])
        e0 = model.atomic_energies_fn.atomic_energies.detach().to(device="cpu", dtype=torch.float64)
        self._e0_table = e0.reshape(len(heads), -1)

    def compute(self, batch: TermBatch) -> TermValue:
        """Σ w r² / Σ w of the batch (eV²), r from ``node_energy`` minus the trained model's own E0."""
        import torch

        if self._e0_table is None:
            raise RuntimeError("protoalign: the loss was called before the model was configured")
        e0_table = self._e0_table.to(batch.weight.device)
        e0 = e0_table[batch.node_heads, batch.element_index]
        energy_minus_e0 = batch.pred["node_energy"].to(torch.float64) - e0
        term, weighted_square_sum, weight_sum = alignment_term(
            energy_minus_e0, batch.target[:, 0], batch.weight, batch.element_index, e0_table.shape[1],
            self.settings.reference, batch.ddp,
        )
        return TermValue(term, {"weighted_square_sum": weighted_square_sum, "weight_sum": weight_sum})

    def format_mean(self, value: float) -> str:
        """The weighted mean in eV² and as an rms in meV."""
        return f"{value:.4e} eV^2 ({1e3 * math.sqrt(value):.1f} meV rms)"

    def describe(self) -> str:
        """One line with the settings of the term."""
        s = self.settings
        return (f"{schedule_description(s)}, {weighting_description(s.weighting, s.cutoff, s.spread_scale)}, "
                f"reference={s.reference}")
