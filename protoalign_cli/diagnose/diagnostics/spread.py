"""Spread: prototypes whose source members' energies are too wide to be a useful alignment target."""

from __future__ import annotations

import dataclasses

import numpy as np

from protoalign_cli.diagnose.context import DiagnosticContext
from protoalign_cli.diagnose.diagnostics.base import DiagnosticResult
from protoalign_cli.diagnose.stats import symbol, wide_prototypes


@dataclasses.dataclass
class FlaggedPrototype:
    """A prototype whose member energy std (meV) exceeds the threshold, with its source and target atoms."""

    prototype: int
    element: str
    energy_std_meV: float
    source_count: int
    target_count: int


@dataclasses.dataclass
class SpreadResult(DiagnosticResult):
    """The flagged prototypes (widest first) and the share of target atoms they hold."""

    threshold_meV: float
    n_flagged: int
    flagged: list[FlaggedPrototype]
    target_fraction_in_flagged: float

    def markdown(self) -> list[str]:
        """The Spread section: the count, and a table of the flagged prototypes."""
        lines = ["## Spread", "",
                 f"{self.n_flagged} prototypes have a member energy std above {self.threshold_meV:g} meV; "
                 f"they hold {self.target_fraction_in_flagged:.1%} of the target atoms."]
        if self.flagged:
            lines += ["", "| prototype | element | energy std (meV) | source atoms | target atoms |",
                      "| ---: | --- | ---: | ---: | ---: |"]
            lines += [f"| {row.prototype} | {row.element} | {row.energy_std_meV:.1f} | {row.source_count} | "
                      f"{row.target_count} |" for row in self.flagged]
        return lines


def spread_of(context: DiagnosticContext) -> SpreadResult:
    """Prototypes whose member energy std exceeds the context's threshold (meV), and the target atoms they hold."""
    prototypes, usage = context.prototypes, context.usage
    energy_std = np.asarray(prototypes.energy_std)
    flagged = wide_prototypes(energy_std, context.spread_threshold_meV / 1000)
    rows = [FlaggedPrototype(int(p), symbol(prototypes.element[p]), float(energy_std[p]) * 1000,
                             int(prototypes.count[p]), int(usage[p]))
            for p in flagged[np.argsort(-energy_std[flagged])]]
    return SpreadResult(context.spread_threshold_meV, int(len(flagged)), rows,
                        float(usage[flagged].sum()) / max(int(usage.sum()), 1))
