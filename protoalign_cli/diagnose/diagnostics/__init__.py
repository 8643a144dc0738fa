"""The registry of diagnostics: report.json key → function(DiagnosticContext) → DiagnosticResult.

The order is the order of the sections in report.md, of the figures and of the verdict's texts.
Adding a diagnostic: one module here (its result class, a subclass of ``DiagnosticResult``, and
its function) and one line below.
"""

from __future__ import annotations

from typing import Callable

from protoalign_cli.diagnose.context import DiagnosticContext
from protoalign_cli.diagnose.diagnostics.atom_energies import atom_energies_of
from protoalign_cli.diagnose.diagnostics.coverage import coverage_of
from protoalign_cli.diagnose.diagnostics.predictor import predictor_of
from protoalign_cli.diagnose.diagnostics.sites import sites_of
from protoalign_cli.diagnose.diagnostics.spread import spread_of
from protoalign_cli.diagnose.diagnostics.usage import usage_of
from protoalign_cli.diagnose.diagnostics.base import DiagnosticResult

DIAGNOSTICS: dict[str, Callable[[DiagnosticContext], DiagnosticResult]] = {
    "coverage": coverage_of,
    "sites": sites_of,
    "energy_predictor": predictor_of,
    "atom_energies": atom_energies_of,
    "spread": spread_of,
    "prototype_usage": usage_of,
}
