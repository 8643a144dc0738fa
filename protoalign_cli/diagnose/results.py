"""The results of ``protoalign diagnose`` gathered, and the verdict drawn from them (pure: results → lines, safe).

Each diagnostic (``protoalign_cli.diagnose.diagnostics``) returns a ``DiagnosticResult``
(``diagnostics.base``); ``DiagnoseResults`` gathers the parts in registry order, ``verdict_lines``
joins their contributions to the verdict.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from protoalign_cli.diagnose.diagnostics.base import DiagnosticResult
from protoalign_cli.diagnose.diagnostics.coverage import CoverageResult


def verdict_lines(parts: Sequence[DiagnosticResult], elements: Sequence[str]) -> tuple[list[str], bool]:
    """One line per element and an overall line; and whether the alignment looks safe.

    Each element line and the overall line concatenate the parts' texts in registry order; the
    alignment looks SAFE when no part gives a reason (the rules: docs/diagnose.md, thresholds in
    ``protoalign_cli.diagnose.settings``); the parts' closing texts follow SAFE/RISKY.
    """
    lines, reasons = [], []
    for name in elements:
        pieces = [part.verdict_for_element(name) for part in parts]
        text = "".join(piece.text for piece in pieces)
        if text:
            lines.append(text)
        reasons += [reason for piece in pieces for reason in piece.reasons]
    pieces = [part.verdict_overall() for part in parts]
    overall = "".join(piece.text for piece in pieces)
    reasons += [reason for piece in pieces for reason in piece.reasons]
    safe = not reasons
    overall += "; alignment looks SAFE" if safe else "; alignment looks RISKY: " + "; ".join(reasons)
    overall += "".join(part.verdict_closing() for part in parts)
    return lines + [overall], safe


@dataclasses.dataclass
class DiagnoseResults:
    """Everything ``protoalign diagnose`` found: the parts by report.json key, the verdict, the figures."""

    n_configs: int
    n_atoms: int
    parts: dict[str, DiagnosticResult]
    verdict: list[str]
    safe: bool
    figures: list[str] = dataclasses.field(default_factory=list)

    @property
    def coverage(self) -> CoverageResult:
        """The coverage part: ``overall`` is the fraction of target atoms covered."""
        return self.parts["coverage"]

    def to_json(self) -> dict:
        """The ``results`` of report.json."""
        return {"n_configs": self.n_configs, "n_atoms": self.n_atoms,
                **{key: part.to_json() for key, part in self.parts.items()},
                "verdict": self.verdict, "safe": self.safe, "figures": self.figures}
