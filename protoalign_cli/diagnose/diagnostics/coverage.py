"""Coverage: the target atoms within ``radius_factor`` x the radius of their nearest prototype.

Figures: the 2-D latent map (map.png) and the distance-ratio histograms (distance_ratio.png).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from protoalign_cli.diagnose.context import DiagnosticContext
from protoalign_cli.diagnose.diagnostics.base import DiagnosticResult, VerdictPart, format_optional
from protoalign_cli.diagnose.figures import map_figure, ratio_figure, save
from protoalign_cli.diagnose.settings import MAP_POINTS_PER_ELEMENT, SAFE_COVERAGE
from protoalign_cli.diagnose.source_atoms import sample_source_atoms
from protoalign_cli.diagnose.stats import element_coverage, symbol


@dataclasses.dataclass
class ElementCoverage:
    """One element: atoms, atoms covered and their fraction, distance-ratio quantiles, prototypes used."""

    n_atoms: int
    n_covered: int
    coverage: float
    has_prototypes: bool
    ratio_quantiles: dict[str, float]
    ratio_max: float | None
    n_prototypes: int
    n_prototypes_used: int


@dataclasses.dataclass
class CoverageResult(DiagnosticResult):
    """Overall and per-element coverage (element order: ascending atomic number)."""

    radius_factor: float
    overall: float
    n_covered: int
    by_element: dict[str, ElementCoverage]

    @property
    def n_atoms(self) -> int:
        """Number of target atoms."""
        return sum(row.n_atoms for row in self.by_element.values())

    def markdown(self) -> list[str]:
        """The Coverage section: the definition and the per-element table."""
        lines = [
            "## Coverage", "",
            f"An atom is covered when its distance to the nearest prototype of its element is at most "
            f"{self.radius_factor:g} x that prototype's radius (95th percentile of the source members' distances).", "",
            "| element | atoms | covered | coverage | ratio p50 | ratio p90 | ratio p99 | ratio max | prototypes used |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, row in self.by_element.items():
            q = row.ratio_quantiles
            lines.append(f"| {name} | {row.n_atoms} | {row.n_covered} | {row.coverage:.3f} | "
                         f"{format_optional(q.get('p50'), 2)} | {format_optional(q.get('p90'), 2)} | "
                         f"{format_optional(q.get('p99'), 2)} | {format_optional(row.ratio_max, 2)} | "
                         f"{row.n_prototypes_used} of {row.n_prototypes} |")
        lines.append(f"| all | {self.n_atoms} | {self.n_covered} | {self.overall:.3f} | | | | | |")
        return lines

    def figures(self, folder: Path, context: DiagnosticContext) -> list[Path]:
        """map.png (latent map, with a sample of the source atoms) and distance_ratio.png (ratio histograms)."""
        a = context.assignment
        source = sample_source_atoms(context.prototypes, MAP_POINTS_PER_ELEMENT)
        return [
            save(map_figure(context.prototypes, context.target["latent"], a.atomic_number, a.prototype_id, a.ratio,
                            self.radius_factor, context.map_method, source), folder / "map.png"),
            save(ratio_figure(a.atomic_number, context.elements, a.ratio, self.radius_factor, self.by_element),
                 folder / "distance_ratio.png"),
        ]

    def verdict_for_element(self, name: str) -> VerdictPart:
        """The element's coverage, or: no prototypes, out of distribution (a reason)."""
        row = self.by_element.get(name)
        if row is None:
            return VerdictPart()
        if not row.has_prototypes:
            return VerdictPart(f"{name}: no prototypes for this element ({row.n_atoms} atoms) -> out of distribution",
                               (f"{name} has no prototypes",))
        return VerdictPart(f"{name}: coverage {row.coverage:.3f} ({row.n_covered}/{row.n_atoms} atoms within "
                           f"{self.radius_factor:g} x radius)")

    def verdict_overall(self) -> VerdictPart:
        """The overall coverage; a reason when it is below SAFE_COVERAGE."""
        reasons = (f"coverage below {SAFE_COVERAGE:g}",) if self.overall < SAFE_COVERAGE else ()
        return VerdictPart(f"overall: coverage {self.overall:.3f} ({self.n_covered}/{self.n_atoms} atoms)", reasons)


def coverage_of(context: DiagnosticContext) -> CoverageResult:
    """Coverage of the target at the context's radius factor, with the prototypes each element uses."""
    a = context.assignment
    elements_of_prototypes = np.asarray(context.prototypes.element)
    table = element_coverage(a.atomic_number, a.ratio, context.radius_factor, np.unique(elements_of_prototypes))
    by_element = {}
    for z, row in table.items():
        mine = elements_of_prototypes == z
        by_element[symbol(z)] = ElementCoverage(**row, n_prototypes=int(mine.sum()),
                                                n_prototypes_used=int(np.count_nonzero(context.usage[mine])))
    n_covered = sum(row.n_covered for row in by_element.values())
    return CoverageResult(context.radius_factor, n_covered / context.n_atoms, n_covered, by_element)
