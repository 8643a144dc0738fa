"""``multihead``: mace's multihead replay fine-tuning, replaying the source structures labelled by the
foundation model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from protoalign_cli.bench.methods.base import Method
from protoalign_cli.bench.source import Pseudolabels
from protoalign_cli.errors import ProtoalignError

PSEUDOLABELS = "pseudolabels"


@dataclasses.dataclass(frozen=True)
class Multihead(Method):
    """Multihead replay (``--multiheads_finetuning True``) with the shared learning rate (``--force_mh_ft_lr``)."""

    kind = "multihead"

    @classmethod
    def check_sources(cls, config, methods: Sequence[Multihead]) -> None:
        """Replay needs source.structures."""
        if not config.source_structures:
            raise ProtoalignError(f"{config.path.name}: multihead needs source.structures "
                                  "(replayed with foundation-model labels)")

    def source_products(self, config, source_dir: Path) -> dict[str, Pseudolabels]:
        """The source structures labelled by the foundation model."""
        return {PSEUDOLABELS: Pseudolabels(source_dir / f"{PSEUDOLABELS}.xyz")}

    def mace_arguments(self, config, products: dict[str, Path]) -> list[str]:
        """Multihead fine-tuning from the foundation model with the pseudolabels as replay data, then ``args``."""
        # mace would otherwise replace --lr by 1e-4 in multihead mode; every method gets the same lr
        return ["--foundation_model", str(config.foundation_model), "--multiheads_finetuning", "True",
                "--pt_train_file", str(products[PSEUDOLABELS]), "--force_mh_ft_lr", "True", *self.args]
