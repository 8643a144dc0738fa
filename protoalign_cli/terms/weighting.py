"""Per-atom weights shared by the alignment terms: how far an atom lies from its prototype, and how
much that prototype's members disagree in energy.

Distances are measured in units of the prototype's radius R_p (95th percentile of its members'
distances, standardized latent units) times ``cutoff``: 'hard' w = 1 if d <= cutoff·R else 0;
'gaussian' w = exp(−(d / (cutoff·R))² / 2). With a spread scale S (eV) a prototype whose members'
energies spread by σ_p (eV) is down-weighted by 1/(1+(σ_p/S)²). Atoms without a prototype weigh 0.
"""

from __future__ import annotations

import numpy as np

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.terms.base import TermOption

WEIGHTINGS = ("gaussian", "hard")


def weighting_options() -> tuple[TermOption, ...]:
    """The command-line options of the weighting (fields ``weighting``, ``cutoff``, ``spread_scale``)."""
    return (
        TermOption("weighting", str, "Per-atom weight from the distance d to the nearest prototype of radius R: "
                                     "gaussian exp(-(d/(cutoff·R))²/2), hard 1 if d <= cutoff·R else 0.", choices=WEIGHTINGS),
        TermOption("cutoff", float, "Multiplier on the prototype radius in the weighting."),
        TermOption("spread_scale", float, "Down-weight prototypes whose member energies spread by σ: "
                                          "w *= 1/(1+(σ/EV)²). Off by default.", metavar="EV"),
    )


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


def prototype_weights(prototype_id: np.ndarray, distance: np.ndarray, radius: np.ndarray, energy_std: np.ndarray,
                      weighting: str, cutoff: float, spread_scale: float | None) -> np.ndarray:
    """Per-atom weight from its assignment (global prototype ids, -1 = none: weight 0) and the per-prototype
    ``radius`` (standardized units) and ``energy_std`` (eV) arrays, indexed by id."""
    prototype_id = np.asarray(prototype_id, dtype=np.int64)
    assigned = prototype_id >= 0
    safe = np.where(assigned, prototype_id, 0)
    weight = distance_weights(distance, np.asarray(radius)[safe], cutoff, weighting)
    weight = weight * spread_weights(np.asarray(energy_std)[safe], spread_scale)
    return np.where(assigned, weight, 0.0)


def check_weighting(weighting: str, cutoff: float, spread_scale: float | None, option_prefix: str) -> None:
    """Raise ProtoalignError for an unknown weighting, a cutoff <= 0 or a spread scale <= 0 (eV);
    messages name ``<option_prefix>-weighting`` etc."""
    if weighting not in WEIGHTINGS:
        raise ProtoalignError(f"{option_prefix}-weighting must be one of {', '.join(WEIGHTINGS)}")
    if not cutoff > 0:
        raise ProtoalignError(f"{option_prefix}-cutoff must be > 0, got {cutoff}")
    if spread_scale is not None and not spread_scale > 0:
        raise ProtoalignError(f"{option_prefix}-spread-scale must be > 0 (eV), got {spread_scale}")


def weighting_description(weighting: str, cutoff: float, spread_scale: float | None) -> str:
    """'weighting=…, cutoff=…x radius[, spread_scale=… eV]' for a term's log line."""
    spread = "" if spread_scale is None else f", spread_scale={spread_scale} eV"
    return f"weighting={weighting}, cutoff={cutoff}x radius{spread}"
