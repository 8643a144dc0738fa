"""Loss terms that ``protoalign finetune`` adds to MACE's loss, by registry name.

Adding a term: one module here with a ``LossTerm`` subclass (see ``base``), one line in ``TERMS``,
and its options declared on the class (``LossTerm.options``): the finetune command builds them.
"""

from __future__ import annotations

from protoalign_cli.terms.base import LossTerm
from protoalign_cli.terms.energy_alignment import EnergyAlignmentTerm
from protoalign_cli.terms.latent_alignment import LatentAlignmentTerm

TERMS: dict[str, type[LossTerm]] = {
    EnergyAlignmentTerm.name: EnergyAlignmentTerm,
    LatentAlignmentTerm.name: LatentAlignmentTerm,
}
