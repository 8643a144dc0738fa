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

    def to_attrs(self) -> dict:
        """Attributes as stored in HDF5 (nested values as JSON strings)."""
        attrs = dataclasses.asdict(self)
        for key in ("e0s", "heads", "layout", "source_files"):
            attrs[key] = json.dumps(attrs[key])
        attrs["kind"] = LATENTS_KIND
        attrs["schema_version"] = SCHEMA_VERSION
        return attrs

    @classmethod
    def from_attrs(cls, attrs) -> "LatentHeader":
        """Rebuild the header from HDF5 attributes."""
        values = {}
        for field in dataclasses.fields(cls):
            value = attrs[field.name]
            if field.name in ("e0s", "heads", "layout", "source_files"):
                value = json.loads(value)
            elif isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, np.generic):
                value = value.item()
            values[field.name] = value
        return cls(**values)

    def e0_of(self, atomic_numbers: np.ndarray) -> np.ndarray:
        """E0 (eV) of the chosen head for each atomic number."""
        table = {int(z): e for z, e in self.e0s[self.head].items()}
        return np.array([table[int(z)] for z in atomic_numbers], dtype=np.float64)

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


def open_latents(path: Path):
    """Open a complete latent file for reading (h5py.File), or raise a one-line ProtoalignError."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise ProtoalignError(f"latent file {path} does not exist")
    try:
        handle = h5py.File(path, "r")
    except Exception as exc:
        raise ProtoalignError(f"cannot open latent file {path}: {exc}") from exc
    if handle.attrs.get("kind") != LATENTS_KIND:
        handle.close()
        raise ProtoalignError(f"{path} is not a protoalign latent file")
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
