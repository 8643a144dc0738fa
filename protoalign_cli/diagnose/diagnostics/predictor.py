"""Energy consistency, per configuration: the prototype predictor against reference energies.

E_pred = sum_i (E0_Z(i) + eps*_p(i)) is compared with the references after per-element offsets
fitted by least squares, as are the composition-only baseline (sum_i E0_Z(i)) and the pretrained
model's own total energy. Figure: predictor.png.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from protoalign_cli.diagnose.context import DiagnosticContext
from protoalign_cli.diagnose.diagnostics.base import DiagnosticResult, VerdictPart, format_optional
from protoalign_cli.diagnose.figures import predictor_figure, save
from protoalign_cli.diagnose.settings import PREDICTORS
from protoalign_cli.diagnose.stats import (
    beyond_composition,
    composition_matrix,
    offset_corrected_errors,
    per_config_sum,
    symbol,
)
from protoalign_cli.io import schema


@dataclasses.dataclass
class PredictorErrors:
    """One predictor against the references (meV; offsets in eV per atom by element symbol)."""

    n_configs: int
    mae_raw_meV: float
    mae_meV: float
    mae_meV_per_atom: float
    rmse_meV: float
    pearson: float | None
    pearson_beyond_composition: float | None
    offsets_eV: dict[str, float]


@dataclasses.dataclass
class PredictorResult(DiagnosticResult):
    """The predictors' errors (keys of PREDICTORS), or why they were not measured (``available`` False).

    ``beyond_composition_eV`` (for the figure, not in report.json): the reference and each
    prediction less its per-element offset fit, per used configuration.
    """

    available: bool
    note: str
    elements: list[str] = dataclasses.field(default_factory=list)
    rank: int | None = None
    errors: dict[str, PredictorErrors] = dataclasses.field(default_factory=dict)
    beyond_composition_eV: dict[str, np.ndarray] | None = None

    def to_json(self) -> dict:
        """``available`` and ``note``; when available also the elements, rank and one entry per predictor."""
        if not self.available:
            return {"available": False, "note": self.note}
        return {"available": True, "note": self.note, "elements": self.elements, "rank": self.rank,
                **{name: dataclasses.asdict(self.errors[name]) for name in PREDICTORS}}

    def markdown(self) -> list[str]:
        """The predictor section: one table row per predictor, or why it was not measured."""
        lines = ["## Energy consistency: prototype predictor", ""]
        if not self.available:
            return lines + [f"Not measured: {self.note}."]
        lines += [
            "E_pred = sum_i (E0 + eps*_p(i)) compared with the reference energies after least-squares per-element "
            f"offsets (composition rank {self.rank}). {self.note}", "",
            "| predictor | configs | MAE raw (meV) | MAE (meV) | MAE (meV/atom) | RMSE (meV) | Pearson r | r beyond composition |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in PREDICTORS:
            row = self.errors[name]
            lines.append(f"| {name.replace('_', ' ')} | {row.n_configs} | {row.mae_raw_meV:.0f} | "
                         f"{row.mae_meV:.1f} | {row.mae_meV_per_atom:.2f} | {row.rmse_meV:.1f} | "
                         f"{format_optional(row.pearson, 3)} | {format_optional(row.pearson_beyond_composition, 3)} |")
        return lines

    def figures(self, folder: Path, context: DiagnosticContext) -> list[Path]:
        """predictor.png, when the predictor was measured."""
        if not self.available:
            return []
        return [save(predictor_figure(self.beyond_composition_eV, self.errors), folder / "predictor.png")]

    def verdict_overall(self) -> VerdictPart:
        """The predictor's error against composition only (it gives no reason: it does not decide SAFE)."""
        if not self.available:
            return VerdictPart(f"; predictor not measured ({self.note})")
        proto, base = self.errors["prototype"], self.errors["composition_only"]
        return VerdictPart(f"; prototype predictor MAE {proto.mae_meV:.0f} meV ({proto.mae_meV_per_atom:.1f} meV/atom, "
                           f"r {format_optional(proto.pearson_beyond_composition, 2)}) vs composition-only "
                           f"{base.mae_meV:.0f} meV")

    def verdict_closing(self) -> str:
        """When the prototype energies predict no better than composition alone: expect no gain."""
        if self.available and self.errors["prototype"].mae_meV >= self.errors["composition_only"].mae_meV:
            return ("; the prototype energies predict the target energies no better than composition alone: "
                    "expect no gain in energy error from alignment")
        return ""


def _left_out(has_reference: np.ndarray, unassigned: np.ndarray) -> list[str]:
    """Notes on the configurations the comparison leaves out."""
    note = []
    if (~has_reference).any():
        note.append(f"{int((~has_reference).sum())} configurations without reference energy left out")
    if (has_reference & unassigned).any():
        note.append(f"{int((has_reference & unassigned).sum())} configurations with an element without prototypes "
                    "left out")
    return note


def predictions(context: DiagnosticContext, usable: np.ndarray) -> dict[str, np.ndarray]:
    """Total energy (eV) of each usable configuration by each predictor (keys of PREDICTORS)."""
    z = context.assignment.atomic_number
    config_index = np.asarray(context.target["config_index"])
    e0 = schema.e0_per_atom(context.prototypes.e0s, context.prototypes.head, z)
    n_configs = context.n_configs
    return {
        "prototype": per_config_sum(config_index, e0 + np.nan_to_num(context.eps_star), n_configs)[usable],
        "composition_only": per_config_sum(config_index, e0, n_configs)[usable],
        "pretrained_model": per_config_sum(config_index, context.target["node_energy"], n_configs)[usable],
    }


def predictor_of(context: DiagnosticContext) -> PredictorResult:
    """Prototype predictor, composition-only baseline and pretrained model against reference energies.

    Configurations without a reference energy, or with an atom of an element that has no
    prototype, are left out (counted in the note).
    """
    has_reference = np.array([e is not None for e in context.references])
    if not has_reference.any():
        return PredictorResult(False, "no reference energies in the target (see --energy-key); predictor skipped")
    config_index = np.asarray(context.target["config_index"])
    unassigned = per_config_sum(config_index, np.isnan(context.eps_star).astype(float), context.n_configs) > 0
    usable = has_reference & ~unassigned
    note = _left_out(has_reference, unassigned)
    if not usable.any():
        return PredictorResult(False, "; ".join(note) + "; predictor skipped")
    elements = context.elements
    composition = composition_matrix(config_index, context.assignment.atomic_number, elements,
                                     context.n_configs)[usable]
    reference = np.array([e if e is not None else np.nan for e in context.references])[usable]
    errors, beyond = {}, {"reference": beyond_composition(reference, composition)}
    for name, predicted in predictions(context, usable).items():
        stats = offset_corrected_errors(predicted, reference, composition)
        stats["offsets_eV"] = {symbol(v): float(o) for v, o in zip(elements, stats["offsets_eV"])}
        errors[name] = PredictorErrors(**stats)
        beyond[name] = beyond_composition(predicted, composition)
    return PredictorResult(True, "; ".join(note), [symbol(v) for v in elements],
                           int(np.linalg.matrix_rank(composition)), errors, beyond)
