"""Typed results of ``protoalign diagnose`` and the verdict drawn from them (pure: results → lines, safe).

Each diagnostic (``protoalign_cli.diagnose.diagnostics``) returns a ``DiagnosticResult``: its part
of report.json (``to_json``, the same keys and values as the report has always had), its Markdown
section, its figures, and its contribution to the verdict (``VerdictPart``: text and reasons why
the alignment looks risky). ``DiagnoseResults`` gathers the parts in registry order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from protoalign_cli.diagnose.context import DiagnosticContext
    from protoalign_cli.diagnose.diagnostics.coverage import CoverageResult


def format_optional(value: float | None, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals, or "n/a" for None."""
    return "n/a" if value is None else f"{value:.{digits}f}"


@dataclasses.dataclass(frozen=True)
class VerdictPart:
    """A diagnostic's contribution to one verdict line: text appended to it, and risk reasons."""

    text: str = ""
    reasons: tuple[str, ...] = ()


class DiagnosticResult:
    """What every diagnostic's result offers; the defaults contribute nothing."""

    def to_json(self) -> Any:
        """The result's part of report.json (JSON-ready)."""
        return dataclasses.asdict(self)

    def markdown(self) -> list[str]:
        """The result's section of report.md, as lines (none: no section)."""
        return []

    def figures(self, folder: Path, context: DiagnosticContext) -> list[Path]:
        """Write the result's figures (PNG) into ``folder``; return their paths."""
        return []

    def verdict_for_element(self, name: str) -> VerdictPart:
        """Text for the verdict line of the element ``name`` (chemical symbol), and reasons."""
        return VerdictPart()

    def verdict_overall(self) -> VerdictPart:
        """Text for the overall verdict line (before SAFE/RISKY), and reasons."""
        return VerdictPart()

    def verdict_closing(self) -> str:
        """Text appended to the overall verdict line after SAFE/RISKY."""
        return ""


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
