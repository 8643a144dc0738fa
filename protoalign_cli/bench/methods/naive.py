"""``naive``: plain fine-tuning of the foundation model (``--multiheads_finetuning False``), the usual baseline."""

from __future__ import annotations

import dataclasses

from protoalign_cli.bench.methods.base import Method


@dataclasses.dataclass(frozen=True)
class Naive(Method):
    """Plain fine-tuning: every behaviour of ``Method`` as it stands."""

    kind = "naive"
