"""The HDF5 files protoalign writes, defined in one place (documented in docs/schema.md).

Latent file (``protoalign extract``): one row per atom.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from protoalign_cli.errors import ProtoalignError

SCHEMA_VERSION = 1
LATENTS_KIND = "protoalign-latents"

# Per-atom datasets of a latent file: name -> (dtype, per-row shape is (latent_dim,) for 'latent').
LATENT = "latent"
NODE_ENERGY = "node_energy"
ENERGY_MINUS_E0 = "energy_minus_e0"
ATOMIC_NUMBER = "atomic_number"
CONFIG_INDEX = "config_index"
ATOM_INDEX = "atom_index"
SOURCE_FILE_INDEX = "source_file_index"
PER_ATOM_DATASETS = {
    NODE_ENERGY: "f8",
    ENERGY_MINUS_E0: "f8",
    ATOMIC_NUMBER: "i4",
    CONFIG_INDEX: "i8",
    ATOM_INDEX: "i4",
    SOURCE_FILE_INDEX: "i4",
}
CHUNK_ROWS = 4096
# Header attributes stored as JSON strings (nested values).
JSON_ATTRS = ("e0s", "heads", "layout", "source_files", "atomic_inter_scale", "atomic_inter_shift")


def e0_per_atom(e0s: dict, head: str, atomic_numbers: np.ndarray) -> np.ndarray:
    """E0 (eV) of ``head`` for each atomic number, from a stored {head: {Z: E0}} table."""
    table = {int(z): float(e) for z, e in e0s[head].items()}
    missing = sorted(set(int(z) for z in atomic_numbers) - set(table))
    if missing:
        raise ProtoalignError(f"no E0 stored for atomic number(s) {missing}")
    return np.array([table[int(z)] for z in atomic_numbers], dtype=np.float64)


@dataclasses.dataclass
class LatentHeader:
    """File-level attributes of a latent file (energies in eV, r_max in Å)."""

    model_sha256: str
    model_path: str
    mace_version: str
    model_type: str
    r_max: float
    e0s: dict  # {head: {Z: E0 (eV)}}
    heads: list
    head: str
    layout: list  # [{"name", "kind", "start", "size"}]
    source_files: list
    dtype: str
    command_line: str
    protoalign_version: str
    shard: str = "0/1"
    n_configs_selected: int = 0
    atomic_inter_scale: dict = dataclasses.field(default_factory=dict)  # {head: scale}; 1 for plain MACE
    atomic_inter_shift: dict = dataclasses.field(default_factory=dict)  # {head: shift (eV)}; 0 for plain MACE

    def to_attrs(self) -> dict:
        """Attributes as stored in HDF5 (nested values as JSON strings)."""
        attrs = dataclasses.asdict(self)
        for key in JSON_ATTRS:
            attrs[key] = json.dumps(attrs[key])
        attrs["kind"] = LATENTS_KIND
        attrs["schema_version"] = SCHEMA_VERSION
        return attrs

    @classmethod
    def from_attrs(cls, attrs) -> "LatentHeader":
        """Rebuild the header from HDF5 attributes."""
        values = {}
        missing = [field.name for field in dataclasses.fields(cls) if field.name not in attrs]
        if missing:
            raise ProtoalignError(f"latent file header lacks {', '.join(missing)} (not written by this protoalign version?)")
        for field in dataclasses.fields(cls):
            value = attrs[field.name]
            if field.name in JSON_ATTRS:
                value = json.loads(value)
            elif isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, np.generic):
                value = value.item()
            values[field.name] = value
        return cls(**values)

    def e0_of(self, atomic_numbers: np.ndarray) -> np.ndarray:
        """E0 (eV) of the chosen head for each atomic number."""
        return e0_per_atom(self.e0s, self.head, atomic_numbers)

    def head_shift(self) -> float:
        """Shift (eV) of the chosen head: node_energy = E0 + sum(energy columns) + shift."""
        return float(self.atomic_inter_shift.get(self.head, 0.0))

    def columns(self, kinds: tuple[str, ...]) -> np.ndarray:
        """Latent column indices of the blocks whose kind is in ``kinds`` ('interaction', 'energy')."""
        cols = [np.arange(b["start"], b["start"] + b["size"]) for b in self.layout if b["kind"] in kinds]
        return np.concatenate(cols) if cols else np.zeros(0, dtype=int)


class LatentWriter:
    """Append per-atom rows to an open h5py.File in chunked, resizable datasets (streaming)."""

    def __init__(self, h5file, header: LatentHeader, latent_dim: int, latent_dtype: str):
        self.file = h5file
        if LATENT not in h5file:
            for key, value in header.to_attrs().items():
                h5file.attrs[key] = value
            h5file.attrs["configs_done"] = 0
            h5file.attrs["complete"] = False
            h5file.create_dataset(
                LATENT, shape=(0, latent_dim), maxshape=(None, latent_dim), dtype=latent_dtype,
                chunks=(CHUNK_ROWS, latent_dim),
            )
            for name, dtype in PER_ATOM_DATASETS.items():
                h5file.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(CHUNK_ROWS,))

    @property
    def n_rows(self) -> int:
        """Number of atoms written so far."""
        return int(self.file.attrs.get("rows_done", 0))

    @property
    def configs_done(self) -> int:
        """Number of selected configurations written so far."""
        return int(self.file.attrs["configs_done"])

    def append(self, rows: dict[str, np.ndarray], n_configs: int) -> None:
        """Append a batch of atoms (all datasets at once), then record progress for --resume."""
        start = self.n_rows
        stop = start + len(rows[ATOMIC_NUMBER])
        for name in (LATENT, *PER_ATOM_DATASETS):
            dataset = self.file[name]
            dataset.resize(stop, axis=0)
            dataset[start:stop] = rows[name]
        self.file.attrs["rows_done"] = stop
        self.file.attrs["configs_done"] = self.configs_done + n_configs
        self.file.flush()

    def truncate_to_progress(self) -> None:
        """Drop rows beyond the recorded progress (a batch interrupted while being written)."""
        for name in (LATENT, *PER_ATOM_DATASETS):
            self.file[name].resize(self.n_rows, axis=0)

    def finish(self) -> None:
        """Mark the file complete."""
        self.file.attrs["complete"] = True
        self.file.flush()


@dataclasses.dataclass
class Latents:
    """A latent file read into memory: per-atom arrays plus the header."""

    header: LatentHeader
    latent: np.ndarray
    node_energy: np.ndarray
    energy_minus_e0: np.ndarray
    atomic_number: np.ndarray
    config_index: np.ndarray
    atom_index: np.ndarray
    source_file_index: np.ndarray
    path: str = ""

    @property
    def n_atoms(self) -> int:
        """Number of atoms (rows)."""
        return len(self.atomic_number)


def open_protoalign_file(path: Path, kind: str, label: str):
    """Open an HDF5 file of the given protoalign ``kind`` for reading, or raise a one-line ProtoalignError.

    ``label`` names the file in messages ('latent', 'prototype').
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise ProtoalignError(f"{label} file {path} does not exist")
    try:
        handle = h5py.File(path, "r")
    except Exception as exc:
        raise ProtoalignError(f"cannot open {label} file {path}: {exc}") from exc
    if handle.attrs.get("kind") != kind:
        handle.close()
        raise ProtoalignError(f"{path} is not a protoalign {label} file")
    return handle


def open_latents(path: Path):
    """Open a complete latent file for reading (h5py.File), or raise a one-line ProtoalignError."""
    handle = open_protoalign_file(path, LATENTS_KIND, "latent")
    if not bool(handle.attrs.get("complete", False)):
        handle.close()
        raise ProtoalignError(f"{path} is incomplete (an interrupted extract?)")
    return handle


def read_latents(path: Path) -> Latents:
    """Read a whole latent file into memory."""
    with open_latents(path) as handle:
        try:
            header = LatentHeader.from_attrs(handle.attrs)
            arrays = {name: handle[name][()] for name in (LATENT, *PER_ATOM_DATASETS)}
        except Exception as exc:
            raise ProtoalignError(f"latent file {path} is corrupt: {type(exc).__name__}: {exc}") from exc
    return Latents(header=header, path=str(path), **arrays)


# ============================================================================ Prototype file
# Written by ``protoalign prototypes`` (protoalign_cli/prototypes/build.py); documented in docs/schema.md.

PROTOTYPES_KIND = "protoalign-prototypes"
PROTOTYPES_SCHEMA_VERSION = 1
# Header attributes: plain scalars, and nested values stored as JSON strings.
PROTOTYPE_SCALAR_ATTRS = {
    "model_sha256": str, "model_path": str, "model_type": str, "mace_version": str, "r_max": float,
    "head": str, "latent_dtype": str, "features": str, "standardized": bool, "k_requested": str,
    "criterion": str, "seed": int, "niter": int, "command_line": str, "protoalign_version": str,
}
PROTOTYPE_JSON_ATTRS = ("heads", "e0s", "layout", "latent_files", "structure_files", "k_grid", "curves", "versions", "notes")
# Datasets: [P] per prototype, [E] / [E, d] per element with prototypes (ascending Z), [d] columns.
PROTOTYPE_DATASETS = {
    "columns": "i8", "element": "i4", "centroid": "f8", "count": "i8", "energy_mean": "f8", "energy_std": "f8",
    "radius": "f8", "elements": "i4", "feature_mean": "f8", "feature_std": "f8", "n_atoms": "i8", "n_distinct": "i8",
}
FAISS_INDEX_GROUP = "faiss_index"  # one uint8 dataset per element (name: Z), faiss.serialize_index bytes


@dataclasses.dataclass
class Prototypes:
    """A prototype file in memory: P prototypes of E elements in d standardized features.

    Prototypes are ordered by element (ascending Z); those of element ``elements[e]`` are the
    contiguous rows whose ``element`` equals it, and ``index[Z]`` (a FAISS IndexFlatL2 over their
    centroids) numbers them from 0 in the same order. Energies in eV; centroids, distances and radii
    in standardized units: ``(select latent columns - feature_mean[e]) / feature_std[e]``.
    """

    # Provenance copied from the latent files.
    model_sha256: str
    model_path: str
    model_type: str
    mace_version: str
    r_max: float  # Å
    head: str
    heads: list
    e0s: dict  # {head: {Z (str): E0 (eV)}}
    layout: list  # latent layout [{"name", "kind", "start", "size"}]
    latent_dtype: str
    latent_files: list  # [{"path", "sha256", "n_atoms", "structure_files"}]
    structure_files: list
    # What was clustered, and how.
    features: str  # 'all', 'interaction' or 'energy'
    columns: np.ndarray  # [d] latent column indices
    standardized: bool
    k_requested: str  # 'auto' or an integer
    k_grid: list
    criterion: str  # 'bic' or 'aic' (used with k 'auto')
    seed: int
    niter: int
    # Per prototype.
    element: np.ndarray  # [P] Z
    centroid: np.ndarray  # [P, d]
    count: np.ndarray  # [P] member atoms
    energy_mean: np.ndarray  # [P] eV, members' energy minus E0
    energy_std: np.ndarray  # [P] eV, population std
    radius: np.ndarray  # [P] 95th percentile of member distances
    # Per element with prototypes.
    elements: np.ndarray  # [E] Z, ascending
    feature_mean: np.ndarray  # [E, d]
    feature_std: np.ndarray  # [E, d]
    n_atoms: np.ndarray  # [E] source atoms
    n_distinct: np.ndarray  # [E] distinct source atoms
    index: dict  # {Z: faiss.IndexFlatL2}
    curves: dict  # {Z: {"k", "sse", "bic", "aic": lists}} (empty lists unless k 'auto')
    # The run.
    command_line: str
    protoalign_version: str
    versions: dict
    notes: list
    path: str = ""

    @property
    def n_prototypes(self) -> int:
        """Number of prototypes over all elements."""
        return len(self.element)


def write_prototypes(path: Path, prototypes: Prototypes) -> None:
    """Write ``prototypes`` as a new HDF5 file at ``path`` (callers write to a temporary name)."""
    import faiss
    import h5py

    with h5py.File(path, "w") as handle:
        handle.attrs["kind"] = PROTOTYPES_KIND
        handle.attrs["schema_version"] = PROTOTYPES_SCHEMA_VERSION
        for name, kind in PROTOTYPE_SCALAR_ATTRS.items():
            handle.attrs[name] = kind(getattr(prototypes, name))
        for name in PROTOTYPE_JSON_ATTRS:
            value = getattr(prototypes, name)
            if name == "curves":
                value = {str(z): curve for z, curve in value.items()}
            handle.attrs[name] = json.dumps(value)
        for name, dtype in PROTOTYPE_DATASETS.items():
            handle.create_dataset(name, data=np.asarray(getattr(prototypes, name), dtype=dtype))
        group = handle.create_group(FAISS_INDEX_GROUP)
        for z, index in prototypes.index.items():
            group.create_dataset(str(int(z)), data=faiss.serialize_index(index))


def read_prototypes(path: Path) -> Prototypes:
    """Read a prototype file (FAISS indexes deserialized), or raise a one-line ProtoalignError."""
    import faiss

    path = Path(path)
    with open_protoalign_file(path, PROTOTYPES_KIND, "prototype") as handle:
        version = int(handle.attrs.get("schema_version", -1))
        if version != PROTOTYPES_SCHEMA_VERSION:
            raise ProtoalignError(f"{path} has prototype schema version {version}; this protoalign reads {PROTOTYPES_SCHEMA_VERSION}")
        try:
            values = {name: kind(_attr_value(handle.attrs[name])) for name, kind in PROTOTYPE_SCALAR_ATTRS.items()}
            values.update({name: json.loads(handle.attrs[name]) for name in PROTOTYPE_JSON_ATTRS})
            values.update({name: handle[name][()] for name in PROTOTYPE_DATASETS})
            values["curves"] = {int(z): curve for z, curve in values["curves"].items()}
            group = handle[FAISS_INDEX_GROUP]
            values["index"] = {int(z): faiss.deserialize_index(group[str(int(z))][()]) for z in values["elements"]}
        except Exception as exc:
            raise ProtoalignError(f"prototype file {path} is corrupt: {type(exc).__name__}: {exc}") from exc
    prototypes = Prototypes(path=str(path), **values)
    _check_prototypes(prototypes)
    return prototypes


def _attr_value(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_prototypes(prototypes: Prototypes) -> None:
    p, d = prototypes.n_prototypes, len(prototypes.columns)
    problems = []
    if prototypes.centroid.shape != (p, d):
        problems.append(f"centroid has shape {prototypes.centroid.shape}, expected {(p, d)}")
    for name in ("count", "energy_mean", "energy_std", "radius"):
        if getattr(prototypes, name).shape != (p,):
            problems.append(f"{name} has {getattr(prototypes, name).shape[0]} rows, expected {p}")
    if np.any(np.diff(prototypes.element) < 0) or not np.array_equal(np.unique(prototypes.element), prototypes.elements):
        problems.append("prototypes are not grouped by element in ascending Z")
    for e, z in enumerate(prototypes.elements):
        index = prototypes.index[int(z)]
        if index.d != d or index.ntotal != int(np.sum(prototypes.element == z)):
            problems.append(f"the FAISS index of Z={z} does not match its prototypes")
        if prototypes.feature_mean[e].shape != (d,) or prototypes.feature_std[e].shape != (d,):
            problems.append(f"the standardization of Z={z} does not have {d} features")
    if problems:
        raise ProtoalignError(f"prototype file {prototypes.path} is corrupt: {problems[0]}")
