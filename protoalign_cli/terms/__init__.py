"""Loss terms that ``protoalign finetune`` adds to MACE's loss, by registry name.

Adding a term: one module here with a ``LossTerm`` subclass (see ``base``), one line in ``TERMS``,
and, if it has options, those options in ``protoalign_cli/cli/finetune.py``.
"""

from __future__ import annotations

from protoalign_cli.terms.base import LossTerm
from protoalign_cli.terms.energy_alignment import EnergyAlignmentTerm

TERMS: dict[str, type[LossTerm]] = {
    EnergyAlignmentTerm.name: EnergyAlignmentTerm,
}
