"""``freeze``: fine-tuning with mace's first layers frozen (``--freeze K``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from protoalign_cli.bench.methods.base import Method, fine_tuning_arguments
from protoalign_cli.errors import ProtoalignError


@dataclasses.dataclass(frozen=True)
class Freeze(Method):
    """Fine-tuning with ``layers`` (entry key ``freeze``) frozen."""

    kind = "freeze"
    entry_keys = frozenset({"freeze"})

    layers: int = 0

    @classmethod
    def own_fields(cls, entry: dict, where: str, name: str) -> dict:
        """``freeze``: the number of layers to freeze (an integer, required)."""
        if not isinstance(entry.get("freeze"), int):
            raise ProtoalignError(f"{where} ({name}): freeze needs an integer 'freeze' (layers to freeze)")
        return {"layers": int(entry["freeze"])}

    def describe(self) -> str:
        """'freeze=K' and the entry's ``args``."""
        return " ".join([f"freeze={self.layers}", *self.args])

    def mace_arguments(self, config, products: dict[str, Path]) -> list[str]:
        """Fine-tuning arguments with ``--freeze K``, then the entry's ``args``."""
        return [*fine_tuning_arguments(config), "--freeze", str(self.layers), *self.args]
