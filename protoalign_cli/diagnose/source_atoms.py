"""A sample of the source atoms a prototype file was built from, for the background of map.png.

The prototype file records its latent files (path, sha256, atoms). A file that is no longer where
it was recorded (also tried relative to the prototype file's folder), or that is not the one
recorded (another model or atom count; the sha256 of a large file is not recomputed for a
figure), is left out and ``SourceAtoms.note`` says why. Reading takes the atomic numbers of every
file and the latent rows of at most ``per_element`` atoms per element.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io import schema


@dataclasses.dataclass
class SourceAtoms:
    """Latent rows ([n, latent_dim]) and atomic numbers ([n]) of sampled source atoms; ``note``: what is missing."""

    latent: np.ndarray
    atomic_number: np.ndarray
    note: str = ""


def recorded_latent_file(record: dict, prototypes_path: str) -> Path | None:
    """Where a latent file recorded in a prototype file is now: as recorded, else beside the prototype file."""
    recorded = Path(record["path"])
    for candidate in (recorded, Path(prototypes_path).parent / recorded):
        if candidate.is_file():
            return candidate
    return None


def _sample_rows(atomic_number: np.ndarray, per_element: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices: every atom of an element with at most ``per_element`` atoms, else a random sample."""
    rows = []
    for z in np.unique(atomic_number):
        mine = np.flatnonzero(atomic_number == z)
        rows.append(mine if len(mine) <= per_element else rng.choice(mine, per_element, replace=False))
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def _read_sample(path: Path, record: dict, model_sha256: str, per_element: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | str:
    """The sampled (latent, atomic number) rows of one latent file, or why it is left out."""
    try:
        with schema.open_latents(path) as handle:
            if handle.attrs.get("model_sha256") != model_sha256:
                return f"{path} holds latents of another model"
            atomic_number = handle[schema.ATOMIC_NUMBER][()]
            if len(atomic_number) != int(record.get("n_atoms", len(atomic_number))):
                return f"{path} has changed since the prototypes were built"
            rows = _sample_rows(atomic_number, per_element, rng)
            if not len(rows):
                return f"{path} holds no atoms"
            return handle[schema.LATENT][rows], atomic_number[rows]
    except (ProtoalignError, OSError, KeyError) as exc:
        return f"{path} is unreadable ({exc})"


def sample_source_atoms(prototypes: schema.Prototypes, per_element: int, seed: int = 0) -> SourceAtoms:
    """At most ``per_element`` source atoms per element from the prototypes' latent files (seeded sample)."""
    rng = np.random.default_rng(seed)
    latents, numbers, missing = [], [], []
    for record in prototypes.latent_files:
        path = recorded_latent_file(record, prototypes.path)
        sample = (_read_sample(path, record, prototypes.model_sha256, per_element, rng) if path is not None
                  else f"{record['path']} not found")
        if isinstance(sample, str):
            missing.append(sample)
            continue
        latents.append(sample[0])
        numbers.append(sample[1])
    if not latents:
        return SourceAtoms(np.zeros((0, 0)), np.zeros(0, dtype=np.int64), "; ".join(missing))
    latent, atomic_number = np.concatenate(latents), np.concatenate(numbers)
    keep = _sample_rows(atomic_number, per_element, rng)
    return SourceAtoms(latent[keep], atomic_number[keep], "; ".join(missing))
