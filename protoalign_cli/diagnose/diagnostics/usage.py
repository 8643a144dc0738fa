"""Prototype usage: how many source and target atoms each prototype holds, its energy and radius."""

from __future__ import annotations

import dataclasses

from protoalign_cli.diagnose.context import DiagnosticContext
from protoalign_cli.diagnose.diagnostics.base import RowsResult, markdown_table
from protoalign_cli.diagnose.stats import symbol


@dataclasses.dataclass
class PrototypeUsage:
    """One prototype: source and target atoms, the target share, eps* (eV), member energy std (meV), radius."""

    prototype: int
    element: str
    source_count: int
    target_count: int
    target_fraction: float
    energy_mean_eV: float
    energy_std_meV: float
    radius: float


class UsageResult(RowsResult):
    """One row (``PrototypeUsage``) per prototype, in prototype order."""

    def markdown(self) -> list[str]:
        """The Prototype usage table."""
        return ["## Prototype usage", "",
                *markdown_table(("prototype", "element", "source atoms", "target atoms", "target share", "eps* (eV)",
                                 "std (meV)", "radius"), "rlrrrrrr",
                                ((str(row.prototype), row.element, str(row.source_count), str(row.target_count),
                                  f"{row.target_fraction:.1%}", f"{row.energy_mean_eV:.3f}",
                                  f"{row.energy_std_meV:.1f}", f"{row.radius:.2f}") for row in self.rows))]


def usage_of(context: DiagnosticContext) -> UsageResult:
    """Source and target counts, energy mean and std, radius of every prototype."""
    prototypes, usage = context.prototypes, context.usage
    total = max(int(usage.sum()), 1)
    return UsageResult([
        PrototypeUsage(p, symbol(prototypes.element[p]), int(prototypes.count[p]), int(usage[p]), int(usage[p]) / total,
                       float(prototypes.energy_mean[p]), float(prototypes.energy_std[p]) * 1000,
                       float(prototypes.radius[p]))
        for p in range(context.n_prototypes)
    ])
