"""What every diagnostic computes from: prototypes, the target's assignment and energies, the settings."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from protoalign_cli.diagnose.stats import prototype_usage, symbol
from protoalign_cli.io.schema import Prototypes
from protoalign_cli.prototypes.assignment import Assignment


@dataclasses.dataclass(frozen=True)
class DiagnosticContext:
    """The shared input of the diagnostics (energies in eV).

    ``target`` holds the pretrained model's per-atom rows of the target (``latents_of_atoms``:
    ``latent``, ``node_energy``, ``energy_minus_e0``, ``atom_index``, ``config_index``);
    ``references`` the reference energy of each configuration or None; ``finetuned_eps`` a
    fine-tuned model's per-atom energy minus its own E0, or None; ``file_of_atom`` the index of
    each atom's target file and ``fixed_files`` the files that hold one fixed molecule.
    """

    prototypes: Prototypes
    assignment: Assignment
    target: dict[str, np.ndarray]
    references: Sequence[float | None]
    finetuned_eps: np.ndarray | None
    file_of_atom: np.ndarray
    fixed_files: Sequence[int]
    radius_factor: float
    spread_threshold_meV: float
    map_method: str

    @property
    def n_configs(self) -> int:
        """Number of target configurations."""
        return len(self.references)

    @property
    def n_atoms(self) -> int:
        """Number of target atoms."""
        return len(self.assignment.atomic_number)

    @property
    def n_prototypes(self) -> int:
        """Number of prototypes, all elements together."""
        return len(self.prototypes.element)

    @functools.cached_property
    def elements(self) -> list[int]:
        """Atomic numbers present in the target, ascending."""
        return sorted(set(int(z) for z in self.assignment.atomic_number))

    @property
    def element_names(self) -> list[str]:
        """Chemical symbols of ``elements``."""
        return [symbol(z) for z in self.elements]

    @functools.cached_property
    def eps_star(self) -> np.ndarray:
        """Per atom, the mean energy-minus-E0 of its prototype's source members ([n] eV; NaN if unassigned)."""
        prototype_id = self.assignment.prototype_id
        return np.where(self.assignment.assigned,
                        np.asarray(self.prototypes.energy_mean)[np.maximum(prototype_id, 0)], np.nan)

    @functools.cached_property
    def usage(self) -> np.ndarray:
        """Target atoms assigned to each prototype ([P] int)."""
        return prototype_usage(self.assignment.prototype_id, self.n_prototypes)
