"""``align``: ``protoalign finetune``, fine-tuning with the prototype alignment term of weight λ."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

from protoalign_cli.bench.command import cli_command
from protoalign_cli.bench.methods.base import Method
from protoalign_cli.bench.source import PrototypeFile
from protoalign_cli.bench.values import as_args
from protoalign_cli.errors import ProtoalignError

SHARED_PROTOTYPES = "prototypes"


def align_weight(entry: dict, where: str) -> float:
    """The entry's ``align_weight`` (λ, dimensionless) as a float; required."""
    try:
        return float(entry["align_weight"])
    except (KeyError, TypeError, ValueError):
        raise ProtoalignError(f"{where}: align needs a numeric align_weight") from None


@dataclasses.dataclass(frozen=True)
class Align(Method):
    """Fine-tuning with the alignment term.

    ``align_weight`` is λ; ``align_args`` other ``protoalign finetune`` options; ``prototypes_args``
    this entry's own ``protoalign prototypes`` options (e.g. K or the feature set), applied to the
    shared source latents instead of source.prototypes_args (None: the shared prototype file).
    """

    kind = "align"
    entry_keys = frozenset({"align_weight", "align_args", "prototypes_args"})

    align_weight: float = 0.0
    align_args: tuple[str, ...] = ()
    prototypes_args: tuple[str, ...] | None = None

    @classmethod
    def own_fields(cls, entry: dict, where: str, name: str) -> dict:
        """``align_weight`` (required), ``align_args``, ``prototypes_args``."""
        fields = {"align_weight": align_weight(entry, f"{where} ({name})"),
                  "align_args": as_args(entry.get("align_args"), f"{where}.align_args")}
        if "prototypes_args" in entry:
            fields["prototypes_args"] = as_args(entry["prototypes_args"], f"{where}.prototypes_args")
        return fields

    def describe(self) -> str:
        """'λ=…', then the finetune, prototypes and mace_run_train options of this entry."""
        return " ".join([f"λ={self.align_weight:g}", *self.align_args, *(self.prototypes_args or ()),
                         *self.args]).strip()

    @property
    def prototypes_key(self) -> str:
        """The key of the prototype file this entry uses among the source products."""
        if self.prototypes_args is None:
            return SHARED_PROTOTYPES
        return f"{SHARED_PROTOTYPES}-" + hashlib.sha256(json.dumps(self.prototypes_args).encode()).hexdigest()[:12]

    @classmethod
    def check_sources(cls, config, methods: Sequence[Align]) -> None:
        """Prototypes need source.prototypes or source.structures; own ``prototypes_args`` need the structures."""
        if config.source_prototypes is None and not config.source_structures:
            raise ProtoalignError(f"{config.path.name}: align needs source.prototypes or source.structures")
        own = [m.name for m in methods if m.prototypes_args is not None]
        if own and not config.source_structures:
            raise ProtoalignError(f"{config.path.name}: {', '.join(own)} set prototypes_args, which needs "
                                  "source.structures (their latents are clustered again)")

    def source_products(self, config, source_dir: Path) -> dict[str, PrototypeFile]:
        """The prototype file: the prebuilt or shared one, or one built with this entry's ``prototypes_args``."""
        key = self.prototypes_key
        if self.prototypes_args is None:
            return {key: PrototypeFile(config.source_prototypes or source_dir / f"{key}.h5",
                                       config.source_prototypes_args)}
        return {key: PrototypeFile(source_dir / f"{key}.h5", self.prototypes_args)}

    def command(self, mace_arguments: list[str], products: dict[str, Path]) -> list[str]:
        """``protoalign finetune --prototypes P --align-weight λ [align_args] -- <mace_run_train arguments>``."""
        return cli_command("finetune", "--prototypes", str(products[self.prototypes_key]),
                           "--align-weight", f"{self.align_weight:g}", *self.align_args, "--", *mace_arguments)
