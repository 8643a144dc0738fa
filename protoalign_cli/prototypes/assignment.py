"""Reading a prototype file and assigning atoms (by their pretrained latents) to the nearest prototype.

Every reader of a prototype file goes through here: the model it was built with (sha256 check,
``pretrained_model``), the head (``check_head``), and target atoms → nearest prototype with the
distance and its ratio to the prototype's radius (``assign_atoms`` → ``Assignment``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io import schema
from protoalign_cli.io.schema import Prototypes
from protoalign_cli.prototypes.features import select_features, standardize
from protoalign_cli.prototypes.search import ASSIGN_CHUNK_ROWS, nearest_prototypes


def load_prototypes(path: Path) -> Prototypes:
    """Read a prototype file written by ``protoalign prototypes`` (FAISS indexes deserialized)."""
    return schema.read_prototypes(Path(path))


def assign(prototypes: Prototypes, latents: np.ndarray, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest prototype of each atom, searched exactly among the prototypes of the atom's element.

    ``latents`` [n, latent_dim] are full latent rows as stored in latent files (same model, head and
    layout as the prototypes), ``Z`` [n] atomic numbers. Returns ``prototype_id`` [n] int64, a global
    index into the per-prototype arrays (-1 where the element has no prototypes), and ``distance``
    [n] float64, the Euclidean distance in the element's standardized feature space (inf for -1).
    """
    latents = np.asarray(latents)
    Z = np.asarray(Z).reshape(-1)
    latent_dim = sum(block["size"] for block in prototypes.layout)
    if latents.ndim != 2 or latents.shape[1] != latent_dim:
        raise ProtoalignError(f"latents have shape {latents.shape}; the prototypes' layout has {latent_dim} columns")
    if len(Z) != len(latents):
        raise ProtoalignError(f"{len(latents)} latent rows but {len(Z)} atomic numbers")
    prototype_id = np.full(len(Z), -1, dtype=np.int64)
    distance = np.full(len(Z), np.inf)
    for e, z in enumerate(prototypes.elements):
        rows = np.flatnonzero(Z == z)
        if not rows.size:
            continue
        offset = int(np.searchsorted(prototypes.element, z))
        centroid = prototypes.centroid[offset:offset + prototypes.index[int(z)].ntotal]
        for start in range(0, len(rows), ASSIGN_CHUNK_ROWS):
            chunk = rows[start:start + ASSIGN_CHUNK_ROWS]
            scaled = standardize(select_features(latents[chunk], prototypes.columns),
                                 prototypes.feature_mean[e], prototypes.feature_std[e])
            local_id, chunk_distance = nearest_prototypes(prototypes.index[int(z)], centroid, scaled)
            prototype_id[chunk] = np.where(local_id >= 0, local_id + offset, -1)
            distance[chunk] = chunk_distance
    return prototype_id, distance


def distance_ratio(distance: np.ndarray, prototype_id: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Distance to the nearest prototype divided by its radius, per atom ([n], dimensionless).

    ``inf`` where the atom's element has no prototype (``prototype_id`` -1) or where the
    prototype's radius is 0 and the atom is not on its centroid.
    """
    distance = np.asarray(distance, dtype=np.float64)
    prototype_id = np.asarray(prototype_id)
    ratio = np.full(distance.shape, np.inf)
    known = prototype_id >= 0
    r = np.asarray(radius, dtype=np.float64)[prototype_id[known]]
    d = distance[known]
    positive = r > 0
    ratio_known = np.where(d > 0, np.inf, 0.0)
    ratio_known[positive] = d[positive] / r[positive]
    ratio[known] = ratio_known
    return ratio


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Target atoms → their nearest source prototype, in the pretrained model's latent space.

    Per atom: ``atomic_number`` [n], ``prototype_id`` [n] int64 (global index into the prototype
    arrays, -1 where the element has no prototypes), ``distance`` [n] float64 (Euclidean, standardized
    feature units, inf for -1) and ``ratio`` [n] = distance / the prototype's radius (``distance_ratio``).
    """

    atomic_number: np.ndarray
    prototype_id: np.ndarray
    distance: np.ndarray
    ratio: np.ndarray

    @property
    def assigned(self) -> np.ndarray:
        """[n] bool: the atom's element has prototypes."""
        return self.prototype_id >= 0


def assignment_of(prototypes: Prototypes, latents: np.ndarray, Z: np.ndarray) -> Assignment:
    """``assign`` packed with the distance ratio: latent rows [n, latent_dim] and Z [n] → Assignment."""
    prototype_id, distance = assign(prototypes, latents, Z)
    return Assignment(np.asarray(Z, dtype=np.int64).reshape(-1), prototype_id, distance,
                      distance_ratio(distance, prototype_id, prototypes.radius))


def pretrained_model(prototypes: Prototypes, model: str | Path | None = None,
                     missing_hint: str = "pass the model explicitly") -> Path:
    """The pretrained model the prototypes were built with, verified by sha256.

    ``model`` (a file or a MACE foundation name) replaces the path recorded in the prototype file;
    either way the file's sha256 must equal the prototypes' ``model_sha256``. ``missing_hint`` ends
    the error when the recorded path is gone (how the caller's user names the model).
    """
    from protoalign_cli.io.provenance import sha256_file
    from protoalign_cli.mace.models import resolve_model_path

    if model is None:
        path = Path(prototypes.model_path)
        if not path.is_file():
            raise ProtoalignError(f"the prototypes' pretrained model {path} is not there; {missing_hint}")
    else:
        path = resolve_model_path(model)
    digest = sha256_file(path)
    if digest != prototypes.model_sha256:
        raise ProtoalignError(
            f"{path} (sha256 {digest[:12]}...) is not the model the prototypes were built with "
            f"(sha256 {prototypes.model_sha256[:12]}...); it is a different model"
        )
    return path


def check_head(prototypes: Prototypes, heads: Sequence[str], model_path: str | Path) -> None:
    """Refuse a model that lacks the head the prototypes describe."""
    if prototypes.head not in heads:
        raise ProtoalignError(f"the prototypes' head {prototypes.head!r} is not a head of {model_path} "
                              f"(heads: {', '.join(heads)})")


def assign_atoms(prototypes: Prototypes, model, info, atoms_list: Sequence, batch_size: int = 32,
                 device: str = "cpu") -> tuple[Assignment, dict[str, np.ndarray]]:
    """Latents of ``atoms_list`` under the loaded pretrained ``model`` (head of the prototypes) and their assignment.

    Returns the Assignment and the latent rows (``latents_of_atoms``: ``latent``, energies in eV,
    ``atomic_number``, ``atom_index``, ``config_index``).
    """
    from protoalign_cli.mace.latents import latents_of_atoms

    check_head(prototypes, info.heads, f"the model (sha256 {info.sha256[:12]}...)")
    rows = latents_of_atoms(model, info, atoms_list, prototypes.head, batch_size, device)
    return assignment_of(prototypes, rows[schema.LATENT], rows[schema.ATOMIC_NUMBER]), rows
