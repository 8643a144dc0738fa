"""Sites: per atom position of the fixed-molecule target files, coverage and pretrained energy shift."""

from __future__ import annotations

import dataclasses

from protoalign_cli.diagnose.context import DiagnosticContext
from protoalign_cli.diagnose.diagnostics.base import RowsResult, format_optional, markdown_table
from protoalign_cli.diagnose.stats import site_statistics


@dataclasses.dataclass
class Site:
    """One atom position of a fixed molecule over its configurations (``pretrained_bias_meV`` in meV)."""

    file: int
    atom_index: int
    element: str
    n_configs: int
    coverage: float
    ratio_median: float | None
    pretrained_bias_meV: float | None


class SitesResult(RowsResult):
    """The sites (``rows``: ``Site``) of every fixed-molecule target file (none: no section)."""

    def markdown(self) -> list[str]:
        """The Sites table, when a target file holds a fixed molecule."""
        if not self.rows:
            return []
        return ["## Sites", "",
                "Per atom position of the fixed-molecule target files: coverage over the configurations, median "
                "distance ratio, and the mean pretrained eps_i - eps*_p(i).", "",
                *markdown_table(("file", "atom", "element", "configs", "coverage", "median ratio",
                                 "pretrained eps - eps* (meV)"), "rrlrrrr",
                                ((str(row.file), str(row.atom_index), row.element, str(row.n_configs),
                                  f"{row.coverage:.3f}", format_optional(row.ratio_median, 2),
                                  format_optional(row.pretrained_bias_meV, 0)) for row in self.rows))]


def sites_of(context: DiagnosticContext) -> SitesResult:
    """Site statistics of the fixed-molecule files; eps_i - eps*_p(i) of the pretrained model (eV in)."""
    a = context.assignment
    difference = context.target["energy_minus_e0"] - context.eps_star
    rows = site_statistics(context.file_of_atom, context.target["atom_index"], a.atomic_number, a.ratio,
                           context.radius_factor, difference, context.fixed_files)
    return SitesResult([Site(**row) for row in rows])
