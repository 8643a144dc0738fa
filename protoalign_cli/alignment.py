"""The prototype alignment term, its per-atom weights and its λ schedule, as small pure functions.

For target-training atoms i with energy-minus-E0 ε_i (eV) in the model being trained, the
nearest prototype p(i) in the pretrained latent space, its mean energy ε*_p (eV) and a weight
w_i >= 0, the term added to MACE's loss is

    λ(epoch) · Σ_i w_i r_i² / Σ_i w_i        (eV²),   r_i = ε_i − ε*_p(i)

('absolute'), or with r_i replaced by r_i minus the weighted batch mean of r over the atoms of
the same element ('centered': only the within-element variation of the per-atom partition is
aligned, so a per-element offset between levels of theory costs nothing).

Weights (computed once, numpy) fall with the distance d_i to the prototype, measured in units of
the prototype's radius R_p (95th percentile of its members' distances) times ``cutoff``:
'hard' w = 1 if d <= cutoff·R else 0; 'gaussian' w = exp(−(d / (cutoff·R))² / 2). With a spread
scale S (eV) a prototype whose members' energies spread by σ_p is down-weighted by 1/(1+(σ_p/S)²).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from protoalign_cli.errors import ProtoalignError

WEIGHTINGS = ("hard", "gaussian")
DECAYS = ("none", "linear", "cosine")
REFERENCES = ("absolute", "centered")


@dataclasses.dataclass(frozen=True)
class AlignmentSettings:
    """The options of the alignment term (see the module docstring for their meaning).

    ``weight`` is λ (dimensionless factor on a term in eV²); ``warmup_epochs`` W: λ rises linearly
    from 0 at epoch 0 to its full value at epoch W; ``decay`` over ``decay_epochs`` D after the
    warmup ('none', 'linear' to 0, 'cosine' to 0); ``cutoff`` multiplies the prototype radius;
    ``spread_scale`` (eV) or None; ``reference`` 'absolute' or 'centered'.
    """

    weight: float = 0.01
    warmup_epochs: int = 0
    decay: str = "none"
    decay_epochs: int | None = None
    weighting: str = "gaussian"
    cutoff: float = 1.0
    spread_scale: float | None = None
    reference: str = "centered"


def check_settings(settings: AlignmentSettings) -> None:
    """Raise ProtoalignError for impossible alignment settings."""
    if not settings.weight >= 0 or not np.isfinite(settings.weight):
        raise ProtoalignError(f"--align-weight must be a finite number >= 0, got {settings.weight}")
    if settings.warmup_epochs < 0:
        raise ProtoalignError(f"--align-warmup-epochs must be >= 0, got {settings.warmup_epochs}")
    if settings.decay not in DECAYS:
        raise ProtoalignError(f"--align-decay must be one of {', '.join(DECAYS)}")
    if settings.decay_epochs is not None and settings.decay_epochs < 1:
        raise ProtoalignError(f"--align-decay-epochs must be >= 1, got {settings.decay_epochs}")
    if settings.weighting not in WEIGHTINGS:
        raise ProtoalignError(f"--align-weighting must be one of {', '.join(WEIGHTINGS)}")
    if not settings.cutoff > 0:
        raise ProtoalignError(f"--align-cutoff must be > 0, got {settings.cutoff}")
    if settings.spread_scale is not None and not settings.spread_scale > 0:
        raise ProtoalignError(f"--align-spread-scale must be > 0 (eV), got {settings.spread_scale}")
    if settings.reference not in REFERENCES:
        raise ProtoalignError(f"--align-reference must be one of {', '.join(REFERENCES)}")


def lambda_at_epoch(epoch: int, settings: AlignmentSettings) -> float:
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


def distance_weights(distance: np.ndarray, radius: np.ndarray, cutoff: float, weighting: str) -> np.ndarray:
    """Per-atom weight in [0, 1] from the distance to the assigned prototype and that prototype's radius.

    Distances and radii are in the same (standardized latent) units. A prototype of radius 0
    gives weight 1 only to atoms exactly on it.
    """
    distance = np.asarray(distance, dtype=np.float64)
    scale = cutoff * np.asarray(radius, dtype=np.float64)
    ratio = np.divide(distance, scale, out=np.where(distance > 0, np.inf, 0.0), where=scale > 0)
    if weighting == "hard":
        return (ratio <= 1.0).astype(np.float64)
    return np.exp(-0.5 * ratio**2)


def spread_weights(energy_std: np.ndarray, spread_scale: float | None) -> np.ndarray:
    """Down-weighting 1/(1+(σ/S)²) of prototypes whose member energies spread by σ (eV); 1 when S is None."""
    energy_std = np.asarray(energy_std, dtype=np.float64)
    if spread_scale is None:
        return np.ones_like(energy_std)
    return 1.0 / (1.0 + (energy_std / spread_scale) ** 2)


def atom_targets_and_weights(prototype_id: np.ndarray, distance: np.ndarray, radius: np.ndarray,
                             energy_mean: np.ndarray, energy_std: np.ndarray,
                             settings: AlignmentSettings) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom target ε* (eV) and weight w from assignments to prototypes (global ids, -1 = none).

    Atoms without a prototype get target 0 and weight 0. Per-prototype arrays are indexed by id.
    """
    prototype_id = np.asarray(prototype_id, dtype=np.int64)
    assigned = prototype_id >= 0
    safe = np.where(assigned, prototype_id, 0)
    target = np.where(assigned, np.asarray(energy_mean, dtype=np.float64)[safe], 0.0)
    weight = distance_weights(distance, np.asarray(radius)[safe], settings.cutoff, settings.weighting)
    weight = weight * spread_weights(np.asarray(energy_std)[safe], settings.spread_scale)
    return target, np.where(assigned, weight, 0.0)


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


def reduce_weighted_mean(weighted_square_sum, weight_sum, ddp: bool):
    """Σ w r² / Σ w (eV²) over this batch, or over all ranks like mace's ``reduce_loss`` under DDP.

    Under DDP the weight sum is all-reduced (without gradient) and the local Σ w r² is scaled by
    the world size, so that DDP's gradient averaging yields the global weighted mean. A zero
    total weight gives 0 (still attached to the graph).
    """
    import torch
    import torch.distributed as dist

    total_weight = weight_sum.detach().clone()
    world_size = 1
    if ddp:
        dist.all_reduce(total_weight, op=dist.ReduceOp.SUM)
        world_size = dist.get_world_size()
    total_weight = total_weight.to(weighted_square_sum.dtype)
    safe_total = torch.where(total_weight > 0, total_weight, torch.ones_like(total_weight))
    return torch.where(total_weight > 0, weighted_square_sum * world_size / safe_total, weighted_square_sum * 0.0)


def alignment_term(energy_minus_e0, target, weight, element_index, n_elements: int, reference: str, ddp: bool):
    """The weighted mean squared residual (eV²) and its parts (Σ w r², Σ w, both detached) of one batch."""
    residual = alignment_residual(energy_minus_e0, target, weight, element_index, n_elements, reference)
    weighted_square_sum = (weight * residual.square()).sum()
    weight_sum = weight.sum()
    term = reduce_weighted_mean(weighted_square_sum, weight_sum, ddp)
    return term, weighted_square_sum.detach(), weight_sum.detach()
