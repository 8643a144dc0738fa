"""``scratch``: a model trained from random initialisation (no foundation model), the lower reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from protoalign_cli.bench.methods.base import Method


@dataclasses.dataclass(frozen=True)
class Scratch(Method):
    """A model from random initialisation; its architecture comes from ``mace_args`` and ``args``."""

    kind = "scratch"

    def mace_arguments(self, config, products: dict[str, Path]) -> list[str]:
        """Only the entry's ``args``: no foundation model, mace's defaults for the rest."""
        return list(self.args)
