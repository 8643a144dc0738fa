"""Energy consistency, per atom: a model's atom energies against the prototype energies eps*_p(i).

eps_i is a model's atom energy minus that model's own E0. The pretrained model is always compared;
a fine-tuned model (``--model``) too, with the prototypes whose target atoms disagree most.
Figure: atom_energies.png (fine-tuned model only).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from protoalign_cli.diagnose.context import DiagnosticContext
from protoalign_cli.diagnose.diagnostics.base import DiagnosticResult, VerdictPart, format_optional
from protoalign_cli.diagnose.figures import atom_energies_figure, save
from protoalign_cli.diagnose.settings import SAFE_SCATTER_RATIO, WORST_PROTOTYPES_SHOWN
from protoalign_cli.diagnose.stats import (
    atom_energy_agreement,
    element_bias,
    prototype_disagreement,
    prototype_usage,
    symbol,
)
from protoalign_cli.io.schema import Prototypes

TABLE_HEADER = [
    "| element | atoms | bias (meV) | MAE (meV) | MAE raw (meV) | scatter RMS (meV) | source spread (meV) "
    "| scatter ratio | bias ratio | Pearson r |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]


@dataclasses.dataclass
class AtomAgreement:
    """One element's eps_i against eps*_p(i) (meV; ratios dimensionless; see ``atom_energy_agreement``)."""

    n_atoms: int
    bias_meV: float
    mae_meV: float
    mae_raw_meV: float
    rms_meV: float
    source_rms_std_meV: float
    scatter_ratio: float | None
    bias_ratio: float | None
    pearson: float | None


@dataclasses.dataclass
class DisagreeingPrototype:
    """A prototype whose target atoms disagree with its energy: mean |eps_i - eps*_p - bias| (meV)."""

    prototype: int
    element: str
    target_count: int
    mean_abs_difference_meV: float
    energy_std_meV: float


@dataclasses.dataclass
class AgreementTable:
    """One model's agreement by element; for the fine-tuned model also the worst prototypes."""

    by_element: dict[str, AtomAgreement]
    worst_prototypes: list[DisagreeingPrototype] | None = None

    def to_json(self) -> dict:
        """``by_element``, and ``worst_prototypes`` when ranked."""
        table = {"by_element": {name: dataclasses.asdict(row) for name, row in self.by_element.items()}}
        if self.worst_prototypes is not None:
            table["worst_prototypes"] = [dataclasses.asdict(row) for row in self.worst_prototypes]
        return table

    def markdown(self, label: str) -> list[str]:
        """The model's table (and its worst prototypes), each followed by a blank line."""
        lines = [f"**{label}**", "", *TABLE_HEADER]
        for name, row in self.by_element.items():
            lines.append(f"| {name} | {row.n_atoms} | {row.bias_meV:+.1f} | {row.mae_meV:.1f} | "
                         f"{row.mae_raw_meV:.1f} | {row.rms_meV:.1f} | {row.source_rms_std_meV:.1f} | "
                         f"{format_optional(row.scatter_ratio, 2)} | {format_optional(row.bias_ratio, 2)} | "
                         f"{format_optional(row.pearson, 3)} |")
        lines.append("")
        if self.worst_prototypes is not None:
            lines += ["Prototypes whose target atoms disagree most (mean |eps_i - eps*_p - bias|):", "",
                      "| prototype | element | target atoms | mean abs difference (meV) | source energy std (meV) |",
                      "| ---: | --- | ---: | ---: | ---: |"]
            lines += [f"| {row.prototype} | {row.element} | {row.target_count} | "
                      f"{row.mean_abs_difference_meV:.1f} | {row.energy_std_meV:.1f} |" for row in self.worst_prototypes]
            lines.append("")
        return lines


@dataclasses.dataclass
class AtomEnergiesResult(DiagnosticResult):
    """The pretrained and fine-tuned models' agreement (None: not measured)."""

    pretrained: AgreementTable | None
    finetuned: AgreementTable | None

    def to_json(self) -> dict:
        """``pretrained`` and ``finetuned`` tables or None."""
        return {label: None if table is None else table.to_json()
                for label, table in (("pretrained", self.pretrained), ("finetuned", self.finetuned))}

    def markdown(self) -> list[str]:
        """The atom-energy section: definitions, then each model's tables."""
        lines = ["## Energy consistency: atom energies against prototype energies", "",
                 "eps_i = a model's atom energy minus its own E0; bias = mean(eps_i - eps*_p(i)) per element; "
                 "MAE = mean |eps_i - eps*_p(i) - bias|; scatter RMS = RMS of eps_i - eps*_p(i) - bias; source spread = "
                 "RMS of the assigned prototypes' member energy std (what the scatter RMS is for the source atoms); "
                 "scatter ratio = scatter RMS / source spread; bias ratio = |bias| / source spread.", ""]
        for label, table in (("pretrained", self.pretrained), ("finetuned", self.finetuned)):
            if table is None:
                lines += [f"{label}: not measured" + (" (no --model)" if label == "finetuned" else "") + ".", ""]
            else:
                lines += table.markdown(label)
        return lines

    def figures(self, folder: Path, context: DiagnosticContext) -> list[Path]:
        """atom_energies.png, with a fine-tuned model."""
        if self.finetuned is None:
            return []
        assigned = context.assignment.assigned
        figure = atom_energies_figure(context.assignment.atomic_number[assigned], context.eps_star[assigned],
                                      context.finetuned_eps[assigned], self.finetuned.by_element)
        return [save(figure, folder / "atom_energies.png")]

    def verdict_for_element(self, name: str) -> VerdictPart:
        """Each model's bias and scatter; reasons: scatter ratio (both models) or pretrained bias ratio
        above SAFE_SCATTER_RATIO (a fine-tuned model's bias is not judged: re-estimated E0s shift it)."""
        text, reasons = "", []
        for label, table in (("pretrained", self.pretrained), ("fine-tuned", self.finetuned)):
            row = table.by_element.get(name) if table is not None else None
            if row is None:
                continue
            text += (f"; {label} eps - eps*: bias {row.bias_meV:+.0f} meV, scatter {row.rms_meV:.0f} meV"
                     f" = {format_optional(row.scatter_ratio, 2)} x source")
            if row.scatter_ratio is not None and row.scatter_ratio > SAFE_SCATTER_RATIO:
                reasons.append(f"{name} {label} atom energies scatter more than {SAFE_SCATTER_RATIO:g} x source")
            if label == "pretrained" and row.bias_ratio is not None and row.bias_ratio > SAFE_SCATTER_RATIO:
                reasons.append(f"{name} atom energies are shifted from their prototypes by more than "
                               f"{SAFE_SCATTER_RATIO:g} x source spread")
        return VerdictPart(text, tuple(reasons))


def agreement_by_element(z: np.ndarray, eps: np.ndarray, eps_star: np.ndarray,
                         member_std: np.ndarray) -> dict[str, AtomAgreement]:
    """``atom_energy_agreement`` keyed by element symbol (eV in, meV out)."""
    return {symbol(k): AtomAgreement(**row) for k, row in atom_energy_agreement(z, eps, eps_star, member_std).items()}


def worst_prototypes(prototypes: Prototypes, z: np.ndarray, prototype_id: np.ndarray, eps: np.ndarray,
                     eps_star: np.ndarray) -> list[DisagreeingPrototype]:
    """The prototypes whose target atoms disagree most with eps*_p: mean |eps_i - eps*_p - bias_Z| (meV),
    bias_Z the per-element mean difference, so that a re-estimated E0 does not dominate the ranking."""
    n_prototypes = len(prototypes.element)
    difference = eps - eps_star
    disagreement = prototype_disagreement(prototype_id, np.abs(difference - element_bias(z, difference)), n_prototypes)
    usage = prototype_usage(prototype_id, n_prototypes)
    order = [int(p) for p in np.argsort(-np.nan_to_num(disagreement, nan=-1.0)) if usage[p] > 0]
    return [DisagreeingPrototype(p, symbol(prototypes.element[p]), int(usage[p]), float(disagreement[p]) * 1000,
                                 float(prototypes.energy_std[p]) * 1000)
            for p in order[:WORST_PROTOTYPES_SHOWN]]


def atom_energies_of(context: DiagnosticContext) -> AtomEnergiesResult:
    """Agreement of the assigned target atoms' energies with their prototypes' (None without assigned atoms)."""
    assigned = context.assignment.assigned
    if not assigned.any():
        return AtomEnergiesResult(None, None)
    z = context.assignment.atomic_number[assigned]
    prototype_id = context.assignment.prototype_id[assigned]
    eps_star = context.eps_star[assigned]
    member_std = np.asarray(context.prototypes.energy_std)[prototype_id]
    pretrained = AgreementTable(agreement_by_element(z, context.target["energy_minus_e0"][assigned], eps_star,
                                                     member_std))
    finetuned = None
    if context.finetuned_eps is not None:
        eps = context.finetuned_eps[assigned]
        finetuned = AgreementTable(agreement_by_element(z, eps, eps_star, member_std),
                                   worst_prototypes(context.prototypes, z, prototype_id, eps, eps_star))
    return AtomEnergiesResult(pretrained, finetuned)
