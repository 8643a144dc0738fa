"""What every diagnostic's result offers (``DiagnosticResult``), and the pieces their sections share.

A diagnostic returns a ``DiagnosticResult``: its part of report.json (``to_json``), its Markdown
section, its figures, and its contribution to the verdict (``VerdictPart``: text and reasons why
the alignment looks risky). ``RowsResult`` is a result that is one table, a dataclass per row.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Sequence

from protoalign_cli.diagnose.context import DiagnosticContext


def format_optional(value: float | None, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals, or "n/a" for None."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(columns: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table: the header, the alignment line (``align``: one letter a column, "l" left or "r"
    right), one line per row of cell texts."""
    return [
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join({"l": "---", "r": "---:"}[letter] for letter in align) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


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


@dataclasses.dataclass
class RowsResult(DiagnosticResult):
    """A result that is one table: ``rows`` (dataclasses), a list in report.json."""

    rows: list

    def to_json(self) -> list[dict]:
        """report.json holds the rows as a list."""
        return [dataclasses.asdict(row) for row in self.rows]
