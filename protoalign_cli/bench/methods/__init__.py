"""Bench method kinds: one module per kind, and the registry from a config's ``method:`` value to its class.

Adding a method kind: write ``methods/<kind>.py`` with a ``Method`` subclass (see methods/base.py),
then import it here and add it to ``REGISTRY``. Nothing else changes.
"""

from __future__ import annotations

from protoalign_cli.bench.methods.align import Align
from protoalign_cli.bench.methods.base import Method
from protoalign_cli.bench.methods.freeze import Freeze
from protoalign_cli.bench.methods.lora import Lora
from protoalign_cli.bench.methods.multihead import Multihead
from protoalign_cli.bench.methods.naive import Naive
from protoalign_cli.bench.methods.scratch import Scratch
from protoalign_cli.bench.methods.select import Select
from protoalign_cli.errors import ProtoalignError

REGISTRY: dict[str, type[Method]] = {kind.kind: kind for kind in (Naive, Align, Multihead, Lora, Freeze, Scratch, Select)}


def parse_method(entry: dict, index: int, section: str = "methods") -> Method:
    """Parse entry ``index`` of a config's ``methods:`` list (``section``: the list's name in errors, e.g. a tune
    file's 'candidates') with the class of its ``method:`` kind."""
    where = f"{section}[{index}]"
    if not isinstance(entry, dict) or "method" not in entry:
        raise ProtoalignError(f"{where} must be a mapping with a 'method' key ({', '.join(REGISTRY)})")
    kind = entry["method"]
    if not isinstance(kind, str) or kind not in REGISTRY:
        raise ProtoalignError(f"{where}: unknown method {kind!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[kind].from_entry(entry, where)
