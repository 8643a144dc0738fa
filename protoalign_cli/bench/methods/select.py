"""``select``: trains nothing; picks among other methods' runs the one with the lowest validation error."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from protoalign_cli.bench.methods.base import Method
from protoalign_cli.bench.stats import SELECTION_CRITERIA, SELECTION_SCOPES, select_by_validation
from protoalign_cli.errors import ProtoalignError

DEFAULT_CRITERION = "valid_energy_mae_mev"


@dataclasses.dataclass(frozen=True)
class Select(Method):
    """A choice among ``candidates`` (entry key ``from``) per (N, seed) (``scope`` 'run') or per N by the mean
    over seeds ('budget'), by the validation column ``select_by`` (entry key ``by``, a SELECTION_CRITERIA key).
    The test set plays no part."""

    kind = "select"
    entry_keys = frozenset({"from", "scope", "by"})
    trains = False

    candidates: tuple[str, ...] = ()
    scope: str = "run"
    select_by: str = DEFAULT_CRITERION

    @classmethod
    def own_fields(cls, entry: dict, where: str, name: str) -> dict:
        """``from`` (a list of method names, required), ``scope`` and ``by``."""
        candidates = entry.get("from")
        if not candidates or not isinstance(candidates, list):
            raise ProtoalignError(f"{where} ({name}): select needs 'from', a list of method names")
        scope = entry.get("scope", "run")
        if scope not in SELECTION_SCOPES:
            raise ProtoalignError(f"{where} ({name}): scope must be 'run' or 'budget'")
        select_by = entry.get("by", DEFAULT_CRITERION)
        if select_by not in SELECTION_CRITERIA:
            raise ProtoalignError(f"{where} ({name}): by must be one of {', '.join(SELECTION_CRITERIA)}")
        return {"candidates": tuple(str(c) for c in candidates), "scope": scope, "select_by": select_by}

    def describe(self) -> str:
        """'lowest <criterion> per (N, seed)' or '... per N'."""
        return f"lowest {SELECTION_CRITERIA[self.select_by]} per {'(N, seed)' if self.scope == 'run' else 'N'}"

    def check_references(self, methods: Sequence[Method], where: str) -> None:
        """Every candidate must be a method of the config that trains."""
        trained = {m.name for m in methods if m.trains}
        for candidate in self.candidates:
            if candidate not in trained:
                raise ProtoalignError(f"{where}: select method {self.name} names {candidate!r}, not a trained method")

    def derived_rows(self, rows: Sequence[dict]) -> list[dict]:
        """The chosen runs' rows (within this entry's own budgets and seeds), renamed to this method;
        their setting names the candidate chosen."""
        within = [r for r in rows if (not self.budgets or r["n_train"] in self.budgets)
                  and (not self.seeds or r["seed"] in self.seeds)]
        return [{**row, "method": self.name, "setting": f"{row['chosen']}: {row['setting']}"}
                for row in select_by_validation(within, list(self.candidates), self.scope, self.select_by)]

    def summary_notes(self, rows: Sequence[dict]) -> list[str]:
        """What this entry picks among, and its choice per (N, seed)."""
        criterion = SELECTION_CRITERIA[self.select_by]
        picks = sorted((r for r in rows if r["method"] == self.name), key=lambda r: (r["n_train"], r["seed"]))
        lines = ["", f"`{self.name}` picks among {', '.join(f'`{c}`' for c in self.candidates)} the one with the "
                 f"lowest {criterion} per {'(N, seed)' if self.scope == 'run' else 'N (mean over seeds)'}; "
                 "the test set plays no part. Choices:", ""]
        return lines + [f"- N={r['n_train']} seed={r['seed']}: {r['chosen']} ({criterion} {r[self.select_by]:.2f} meV)"
                        for r in picks]
