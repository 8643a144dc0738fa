"""The latent alignment term: pull each target atom's invariant latents toward a target in latent space.

The latents are the 0e node features after each interaction block (``node_feats`` of MACE's output,
the interaction columns of a latent file), restricted to the interaction columns the prototype file
clustered, and standardized with that file's per-element map: z = (h − μ_e) / σ_e (dimensionless).
For target atoms i with weight w_i >= 0 and a target z*_i, the term added to MACE's loss is

    λ(epoch) · Σ_i w_i r_i² / Σ_i w_i,      r_i² = |z_i − z*_i|² / d      (standardized units²)

over the d columns, so that λ means the same for any number of features. Two targets:

- 'prototype': z*_i is the centroid of the atom's nearest source prototype (the paper's alignment);
- 'pretrained': z*_i is the atom's own standardized latents in the pretrained model: the control
  without source information (the term is 0 at the pretrained model), a latent-space analogue of
  keeping the weights near their starting point.

Both use the same per-atom weights (``protoalign_cli.terms.weighting``: distance to the assigned
prototype, optionally its energy spread), so the two variants differ in the target only. Atoms of
elements without prototypes weigh 0. The term reads ``node_feats`` of the forward pass MACE already
runs: no extra forward pass.
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

TARGETS = ("prototype", "pretrained")


@dataclasses.dataclass(frozen=True)
class LatentAlignmentSettings(ScheduleSettings):
    """The options of the latent alignment term: the λ schedule (``weight`` λ on a term in standardized
    units², warmup, decay), ``target`` 'prototype' or 'pretrained', and the per-atom weighting
    (``weighting`` 'gaussian' or 'hard', ``cutoff`` × prototype radius, ``spread_scale`` in eV or None)."""

    weight: float = 0.0
    target: str = "prototype"
    weighting: str = "gaussian"
    cutoff: float = 1.0
    spread_scale: float | None = None


def interaction_columns(layout: list[dict], columns: np.ndarray) -> np.ndarray:
    """Positions in ``columns`` (latent column indices) of those in the layout's interaction blocks."""
    interaction = np.concatenate([np.arange(b["start"], b["start"] + b["size"]) for b in layout
                                  if b["kind"] == "interaction"] or [np.zeros(0, dtype=np.int64)])
    return np.flatnonzero(np.isin(columns, interaction))


def node_feature_columns(slices: list[list[tuple[int, int]]], latent_columns: np.ndarray) -> np.ndarray:
    """The ``node_feats`` column of each interaction latent column.

    ``slices``: per interaction block, the (start, stop) ranges of its 0e features in ``node_feats``
    (``protoalign_cli.mace.models.scalar_slices``); a latent row starts with those ranges concatenated.
    """
    feats = np.concatenate([np.arange(start, stop) for layer in slices for start, stop in layer])
    latent_columns = np.asarray(latent_columns, dtype=np.int64)
    if latent_columns.size and latent_columns.max() >= len(feats):
        raise ProtoalignError("the prototype file's latent layout does not match the trained model's node features")
    return feats[latent_columns]


def standardized(latent: np.ndarray, element_row: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(latent − mean[e]) / std[e] per atom (rows of ``mean``/``std`` by ``element_row``; -1 gives zeros)."""
    has_map = element_row >= 0
    safe = np.where(has_map, element_row, 0)
    return np.where(has_map[:, None], (latent - mean[safe]) / std[safe], 0.0)


def latent_residual_square(latent, mean, std, target):
    """Per-atom |(h − μ) / σ − z*|² / d (standardized units², torch) of latents ``latent`` [n, d]."""
    return ((latent - mean) / std - target).square().mean(dim=1)


class LatentAlignmentTerm(WeightedMeanTerm):
    """Pulls each target atom's standardized invariant latents toward its prototype's centroid or its own
    pretrained latents (standardized units²)."""

    name = "latent_alignment"
    settings_class = LatentAlignmentSettings
    option_prefix = "--latent"
    record_key = "latent"
    options = (
        TermOption("weight", float, "λ (dimensionless) of the latent alignment term, a mean squared distance in "
                                    "standardized latent units; off unless given (0 = plain MACE, bit for bit).",
                   metavar="LAMBDA"),
        TermOption("target", str, "prototype: pull each atom's latents toward its nearest source prototype's "
                                  "centroid; pretrained: toward its own latents in the pretrained model (the control "
                                  "without source information).", choices=TARGETS),
        *weighting_options(),
        *schedule_options(),
    )
    lambda_key = "latent_lambda"
    settings_key = "latent_settings"
    log_name = "latent"

    def __init__(self, settings: LatentAlignmentSettings, targets: AtomTargets, prototypes, sub: np.ndarray):
        super().__init__(settings, targets)
        self._latent_columns = np.asarray(prototypes.columns)[sub]
        self._elements = np.asarray(prototypes.elements, dtype=np.int64)
        self._mean = np.asarray(prototypes.feature_mean, dtype=np.float64)[:, sub]
        self._std = np.asarray(prototypes.feature_std, dtype=np.float64)[:, sub]
        self._node_columns = None  # torch [d] columns of node_feats
        self._map = None  # torch (mean, std) [n_model_elements, d]

    @classmethod
    def needs_pretrained_latents(cls, settings: LatentAlignmentSettings) -> bool:
        """The 'pretrained' target needs the target atoms' pretrained latents."""
        return settings.target == "pretrained"

    @classmethod
    def check_settings(cls, settings: LatentAlignmentSettings) -> None:
        """The schedule's checks, then the target's and the weighting's."""
        super().check_settings(settings)
        if settings.target not in TARGETS:
            raise ProtoalignError(f"{cls.option_prefix}-target must be one of {', '.join(TARGETS)}")
        check_weighting(settings.weighting, settings.cutoff, settings.spread_scale, cls.option_prefix)

    @classmethod
    def build(cls, settings: LatentAlignmentSettings, atoms: TargetAtoms, prototypes) -> "LatentAlignmentTerm":
        """Targets z* (centroids, or the pretrained latents standardized) on the clustered interaction columns."""
        sub = interaction_columns(prototypes.layout, np.asarray(prototypes.columns))
        if sub.size == 0:
            raise ProtoalignError("the prototype file clustered no interaction features (built with --features "
                                  "energy); the latent term needs prototypes built with --features all or interaction")
        assignment = atoms.assignment
        ids = assignment.prototype_id
        safe = np.where(ids >= 0, ids, 0)
        if settings.target == "prototype":
            target = np.where((ids >= 0)[:, None], np.asarray(prototypes.centroid, dtype=np.float64)[safe][:, sub], 0.0)
        else:
            if atoms.latent is None:
                raise RuntimeError("protoalign: the 'pretrained' latent target needs the target atoms' latents")
            row = _element_rows(prototypes.elements, assignment.atomic_number)
            columns = np.asarray(prototypes.columns)[sub]
            target = standardized(np.asarray(atoms.latent, dtype=np.float64)[:, columns], row,
                                  np.asarray(prototypes.feature_mean)[:, sub], np.asarray(prototypes.feature_std)[:, sub])
        weight = prototype_weights(ids, assignment.distance, prototypes.radius, prototypes.energy_std,
                                   settings.weighting, settings.cutoff, settings.spread_scale)
        return cls(settings, AtomTargets(target, weight), prototypes, sub)

    def attach_model(self, model) -> None:
        """Map the clustered columns onto the trained model's ``node_feats`` and its elements onto the map."""
        import torch

        from protoalign_cli.mace.models import scalar_slices

        self._node_columns = torch.as_tensor(node_feature_columns(scalar_slices(model), self._latent_columns))
        rows = _element_rows(self._elements, np.asarray([int(z) for z in model.atomic_numbers]))
        safe = np.where(rows >= 0, rows, 0)
        mean = np.where((rows >= 0)[:, None], self._mean[safe], 0.0)
        std = np.where((rows >= 0)[:, None], self._std[safe], 1.0)
        self._map = (torch.from_numpy(mean), torch.from_numpy(std))

    def compute(self, batch: TermBatch) -> TermValue:
        """Σ w r² / Σ w of the batch (standardized units²) from ``node_feats`` of MACE's forward pass."""
        import torch

        if self._map is None:
            raise RuntimeError("protoalign: the loss was called before the model was configured")
        device = batch.weight.device
        latent = batch.pred["node_feats"][:, self._node_columns.to(device)].to(torch.float64)
        mean, std = (table.to(device)[batch.element_index] for table in self._map)
        return self.weighted_value(latent_residual_square(latent, mean, std, batch.target), batch.weight, batch.ddp)

    def format_mean(self, value: float) -> str:
        """The weighted mean square and its root (standardized units)."""
        return f"{value:.4e} ({math.sqrt(value):.3f} rms, standardized)"

    def describe(self) -> str:
        """One line with the settings of the term."""
        s = self.settings
        return (f"latent: {schedule_description(s)}, target={s.target}, "
                f"{weighting_description(s.weighting, s.cutoff, s.spread_scale)}, {len(self._latent_columns)} features")


def _element_rows(elements: np.ndarray, atomic_numbers: np.ndarray) -> np.ndarray:
    """Row of each atomic number in ``elements``, -1 where absent."""
    lookup = {int(z): row for row, z in enumerate(elements)}
    return np.array([lookup.get(int(z), -1) for z in atomic_numbers], dtype=np.int64)
