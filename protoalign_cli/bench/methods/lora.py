"""``lora``: mace's LoRA fine-tuning of the foundation model (``--lora True``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from protoalign_cli.bench.methods.base import Method, fine_tuning_arguments


@dataclasses.dataclass(frozen=True)
class Lora(Method):
    """LoRA adapters on the foundation model; rank and alpha through ``args`` (``lora_rank``, ``lora_alpha``)."""

    kind = "lora"

    def mace_arguments(self, config, products: dict[str, Path]) -> list[str]:
        """Fine-tuning arguments with ``--lora True``, then the entry's ``args``."""
        return [*fine_tuning_arguments(config), "--lora", "True", *self.args]
