"""What every bench method kind is: the ``Method`` base class and the entry keys all kinds share.

A kind is a frozen dataclass subclass of ``Method`` that sets ``kind`` (the YAML ``method:`` value)
and overrides only what differs from plain fine-tuning: its extra entry keys (``entry_keys`` and
``own_fields``), its ``describe`` text, the source products it reads, its mace_run_train
arguments, and the program that trains it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, Sequence

from protoalign_cli.bench.command import executable
from protoalign_cli.bench.values import as_args, harness_clash, int_list
from protoalign_cli.errors import ProtoalignError

if TYPE_CHECKING:
    from protoalign_cli.bench.config import BenchConfig
    from protoalign_cli.bench.source import SourceProduct

COMMON_KEYS = frozenset({"name", "method", "args", "budgets", "seeds", "refit_offset"})


class TrainingSettings(Protocol):
    """What a method's training command reads from the settings it is given (a ``BenchConfig``, or tune's
    settings): the foundation model it fine-tunes."""

    foundation_model: Path


def fine_tuning_arguments(config: TrainingSettings) -> list[str]:
    """mace_run_train arguments that fine-tune the foundation model in single-head mode."""
    return ["--foundation_model", str(config.foundation_model), "--multiheads_finetuning", "False"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One ``methods:`` entry of a bench config; as it stands, plain fine-tuning.

    ``name`` is unique in the config (the runs' folder), ``args`` are extra mace_run_train
    arguments, ``budgets`` and ``seeds`` restrict the entry to part of the grid (None: all);
    ``refit_offset`` refits the trained model's E0s on its training split before it is evaluated
    (``protoalign_cli.mace.offset``).
    """

    kind: ClassVar[str] = ""
    entry_keys: ClassVar[frozenset[str]] = frozenset()
    trains: ClassVar[bool] = True

    name: str
    args: tuple[str, ...] = ()
    budgets: tuple[int, ...] | None = None
    seeds: tuple[int, ...] | None = None
    refit_offset: bool = False

    @classmethod
    def from_entry(cls, entry: dict, where: str) -> Method:
        """Parse one ``methods:`` entry (a mapping); ``where`` ('methods[i]') starts every error line."""
        unknown = set(entry) - COMMON_KEYS - cls.entry_keys
        if unknown:
            raise ProtoalignError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        name = str(entry.get("name", cls.kind))
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ProtoalignError(f"{where}: name {name!r} may hold only letters, digits, '-', '_' and '.'")
        args = as_args(entry.get("args"), f"{where}.args")
        clash = harness_clash(args)
        if clash:
            raise ProtoalignError(f"{where}: {', '.join(clash)} is set by the harness; remove it")
        refit_offset = entry.get("refit_offset", False)
        if not isinstance(refit_offset, bool):
            raise ProtoalignError(f"{where}.refit_offset must be true or false")
        if refit_offset and not cls.trains:
            raise ProtoalignError(f"{where}: refit_offset applies to methods that train; {cls.kind!r} trains nothing")
        return cls(name=name, args=args,
                   budgets=int_list(entry["budgets"], f"{where}.budgets") if "budgets" in entry else None,
                   seeds=int_list(entry["seeds"], f"{where}.seeds") if "seeds" in entry else None,
                   refit_offset=refit_offset, **cls.own_fields(entry, where, name))

    @classmethod
    def own_fields(cls, entry: dict, where: str, name: str) -> dict:
        """This kind's own dataclass fields from the entry's ``entry_keys`` (``where``, ``name``: for errors)."""
        return {}

    def variants(self) -> tuple[Method, ...]:
        """The methods this entry stands for: itself (a kind with a grid in one entry returns one per point)."""
        return (self,)

    @property
    def setting(self) -> str:
        """A short description of this method's own settings (runs.csv's ``setting`` column)."""
        parts = [self.describe(), "offset refit" if self.refit_offset else ""]
        return " + ".join(part for part in parts if part)

    def describe(self) -> str:
        """This kind's settings in words and arguments."""
        return " ".join(self.args)

    @classmethod
    def check_sources(cls, config: BenchConfig, methods: Sequence[Method]) -> None:
        """Raise ProtoalignError when the config's source lacks what ``methods`` (all of this kind) need."""

    def check_references(self, methods: Sequence[Method], where: str) -> None:
        """Raise ProtoalignError when this entry names other entries that are not fit (``methods``: all entries)."""

    def source_products(self, config: BenchConfig, source_dir: Path) -> dict[str, SourceProduct]:
        """The source products this method's runs read, by key (they enter the fingerprint by content)."""
        return {}

    def mace_arguments(self, config: TrainingSettings, products: dict[str, Path]) -> list[str]:
        """This method's mace_run_train arguments, after those the harness sets for every run."""
        return [*fine_tuning_arguments(config), *self.args]

    def command(self, mace_arguments: list[str], products: dict[str, Path]) -> list[str]:
        """The argv that trains a run with these mace_run_train arguments."""
        return [executable("mace_run_train"), *mace_arguments]

    def derived_rows(self, rows: Sequence[dict]) -> list[dict]:
        """runs.csv rows this entry adds from the trained runs' ``rows`` (for a method that trains nothing)."""
        return []

    def summary_notes(self, rows: Sequence[dict]) -> list[str]:
        """Markdown lines this entry adds below the summary table (``rows``: every runs.csv row)."""
        return []
