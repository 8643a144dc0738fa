"""The target atoms every loss term is built from: the atoms of the training and validation files and their
nearest prototype in the pretrained latent space, computed once before training and cached (``.npz``).

The cache holds per atom ``atomic_numbers``, ``positions`` (Å), ``prototype_id`` (-1: the element has no
prototypes), ``distance`` (standardized latent units), per configuration ``config_offsets``
[n_configs + 1] and ``config_role`` (0 train, 1 valid), and ``latent`` when a term asked for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.prototypes.assignment import Assignment

CONFIG_CHUNK = 1024  # configurations whose latents are held in memory at once


@dataclasses.dataclass(frozen=True)
class TargetAtoms:
    """The atoms of the target files (file order, E0 reference atoms skipped) and their assignment.

    ``positions`` [n, 3] (Å); ``config_offsets`` [n_configs + 1] delimit the configurations;
    ``config_role`` [n_configs] is 0 for a training file, 1 for a validation file; ``assignment``
    holds per atom the atomic number, nearest prototype, distance and distance / radius;
    ``latent`` [n, latent_dim] the atoms' pretrained latent rows, kept only when a chosen term
    declares ``needs_pretrained_latents`` (else None).
    """

    positions: np.ndarray
    config_offsets: np.ndarray
    config_role: np.ndarray
    assignment: Assignment
    latent: np.ndarray | None = None

    @property
    def atomic_numbers(self) -> np.ndarray:
        """[n] atomic numbers."""
        return self.assignment.atomic_number


def assign_configurations(model, info, prototypes, labelled: Iterable[tuple[str, Sequence]], batch_size: int,
                          device: str, keep_latents: bool = False) -> TargetAtoms:
    """Assign every atom of the (role, configurations) pairs to its nearest prototype in the latent space of
    the loaded pretrained ``model``; ``keep_latents`` keeps the atoms' pretrained latent rows."""
    from protoalign_cli.prototypes.assignment import assign_atoms

    parts: list[Assignment] = []
    latents, positions, lengths, roles = [], [], [], []
    for role, configurations in labelled:
        for start in range(0, len(configurations), CONFIG_CHUNK):
            chunk = configurations[start:start + CONFIG_CHUNK]
            assignment, rows = assign_atoms(prototypes, model, info, chunk, batch_size, device)
            parts.append(assignment)
            latents += [rows["latent"]] if keep_latents else []
            positions += [np.asarray(a.positions, dtype=np.float64) for a in chunk]
            lengths += [len(a) for a in chunk]
            roles += [0 if role == "train" else 1] * len(chunk)
    assignment = Assignment(*(np.concatenate([getattr(p, field.name) for p in parts])
                              for field in dataclasses.fields(Assignment)))
    return TargetAtoms(
        positions=np.concatenate(positions),
        config_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        config_role=np.asarray(roles, dtype=np.int8), assignment=assignment,
        latent=np.concatenate(latents) if keep_latents else None,
    )


def save_target_atoms(path: Path, atoms: TargetAtoms) -> None:
    """Write the assignment cache atomically (every DDP rank may write the same file)."""
    arrays = {
        "atomic_numbers": atoms.atomic_numbers.astype(np.int64), "positions": atoms.positions,
        "prototype_id": atoms.assignment.prototype_id, "distance": atoms.assignment.distance,
        "config_offsets": atoms.config_offsets, "config_role": atoms.config_role,
    }
    if atoms.latent is not None:
        arrays["latent"] = atoms.latent
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def load_target_atoms(path: Path, prototypes, need_latents: bool = False) -> TargetAtoms | None:
    """Read the assignment cache, or None when absent, unreadable or without the latents needed (recomputed)."""
    from protoalign_cli.prototypes.assignment import distance_ratio

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as handle:
            arrays = {name: handle[name] for name in handle.files}
        ids, distance = arrays["prototype_id"], arrays["distance"]
        assignment = Assignment(arrays["atomic_numbers"], ids, distance, distance_ratio(distance, ids, prototypes.radius))
        atoms = TargetAtoms(arrays["positions"], arrays["config_offsets"], arrays["config_role"], assignment,
                            arrays.get("latent"))
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return None if need_latents and atoms.latent is None else atoms


def check_missing_elements(assignment, policy: str) -> list[str]:
    """Element symbols of the target atoms (an ``Assignment``) without prototypes; an error unless
    ``policy`` is 'ignore'."""
    from ase.data import chemical_symbols

    missing = np.unique(assignment.atomic_number[~assignment.assigned])
    symbols = [chemical_symbols[int(z)] for z in missing]
    if symbols and policy == "error":
        raise ProtoalignError(
            f"target element(s) {', '.join(symbols)} have no prototypes; build prototypes from source data "
            "containing them, or pass --align-missing-elements ignore to give their atoms weight 0"
        )
    return symbols


def assignment_statistics(atoms: TargetAtoms, weight: np.ndarray) -> dict:
    """Per element and overall: atoms, fraction with w > 0, mean w, and distance d / prototype radius R.

    d/R is summarized by its median and the fraction of atoms with d <= R (inside the radius that
    holds 95 % of the prototype's own members); a mean would be dominated by prototypes of almost
    zero radius (clusters of near-duplicate source atoms).
    """
    from ase.data import chemical_symbols

    assigned, ratio = atoms.assignment.assigned, atoms.assignment.ratio

    def summarize(mask: np.ndarray) -> dict:
        inside = mask & assigned
        return {
            "atoms": int(mask.sum()),
            "fraction_weighted": float((weight[mask] > 0).mean()) if mask.any() else 0.0,
            "mean_weight": float(weight[mask].mean()) if mask.any() else 0.0,
            "median_distance_over_radius": float(np.median(ratio[inside])) if inside.any() else None,
            "fraction_within_radius": float((ratio[inside] <= 1).mean()) if inside.any() else 0.0,
        }

    numbers = atoms.atomic_numbers
    roles = atoms.config_role
    return {
        "configurations": {"train": int((roles == 0).sum()), "valid": int((roles == 1).sum())},
        "all": summarize(np.ones(len(numbers), dtype=bool)),
        "per_element": {chemical_symbols[int(z)]: summarize(numbers == z) for z in np.unique(numbers)},
    }


