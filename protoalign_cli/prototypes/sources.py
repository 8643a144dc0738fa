"""The latent files a prototype build reads, checked up front and then read in chunks of atoms.

Any number of latent files of one model, head, layout and dtype are accepted, among them the
shards ``I/N`` of an ``extract --shard`` array job: shards are taken as they are (no
``merge-latents`` needed), but every shard of an array must be there and none twice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io import schema
from protoalign_cli.io.provenance import sha256_file
from protoalign_cli.prototypes.features import select_features

# Atoms read at a time by the streaming passes (the ``chunk`` term of the memory formula).
STREAM_CHUNK_ROWS = 16384
UNSHARDED = ("0/1", "merged")  # LatentHeader.shard of files that are not one shard of several
COMPATIBLE_FIELDS = (("model_sha256", "model"), ("head", "head"), ("layout", "latent layout"), ("dtype", "dtype"))


@dataclasses.dataclass
class Chunk:
    """Consecutive atoms of one latent file: selected latent columns [n, d] (file dtype), Z [n], energy minus E0 [n] (eV)."""

    features: np.ndarray
    atomic_number: np.ndarray
    energy: np.ndarray


@dataclasses.dataclass
class LatentSources:
    """Checked latent files (paths, headers, atom counts) and chunked reading of their selected columns."""

    paths: list
    headers: list
    n_atoms: list

    @property
    def first(self) -> schema.LatentHeader:
        """The header every file agrees with (model, head, layout, dtype)."""
        return self.headers[0]

    def element_counts(self, chunk_rows: int = STREAM_CHUNK_ROWS) -> dict[int, int]:
        """Atoms per element over all files ({Z: n}, ascending Z), reading only the atomic numbers."""
        counts: dict[int, int] = {}
        for path, n_atoms in zip(self.paths, self.n_atoms):
            with schema.open_latents(path) as handle:
                for start in range(0, n_atoms, chunk_rows):
                    numbers = _read(path, lambda: handle[schema.ATOMIC_NUMBER][start:start + chunk_rows])
                    values, value_counts = np.unique(numbers, return_counts=True)
                    for z, n in zip(values.tolist(), value_counts.tolist()):
                        counts[z] = counts.get(z, 0) + n
        return dict(sorted(counts.items()))

    def chunks(self, columns: np.ndarray, chunk_rows: int = STREAM_CHUNK_ROWS) -> Iterator[Chunk]:
        """Every atom of every file, in order, ``chunk_rows`` at a time; non-finite values are refused."""
        for path, n_atoms in zip(self.paths, self.n_atoms):
            with schema.open_latents(path) as handle:
                for start in range(0, n_atoms, chunk_rows):
                    stop = min(start + chunk_rows, n_atoms)
                    chunk = _read(path, lambda: Chunk(
                        features=select_features(handle[schema.LATENT][start:stop], columns),
                        atomic_number=handle[schema.ATOMIC_NUMBER][start:stop],
                        energy=handle[schema.ENERGY_MINUS_E0][start:stop],
                    ))
                    if not np.isfinite(chunk.features).all() or not np.isfinite(chunk.energy).all():
                        raise ProtoalignError(f"latent file {path} holds non-finite latents or energies")
                    yield chunk

    def provenance(self) -> list[dict]:
        """Per file: absolute path, sha256, atoms and structure files (as stored in a prototype file)."""
        return [{"path": str(Path(path).resolve()), "sha256": sha256_file(path), "n_atoms": n_atoms,
                 "structure_files": header.source_files}
                for path, header, n_atoms in zip(self.paths, self.headers, self.n_atoms)]


def open_sources(paths: Sequence[Path]) -> LatentSources:
    """Check latent files before anything is read: readable, complete, compatible, shards whole and disjoint."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ProtoalignError("give at least one latent file")
    described = [_describe(path) for path in paths]
    headers = [header for header, _ in described]
    check_compatible(paths, headers)
    check_shards(paths, headers)
    return LatentSources(paths=paths, headers=headers, n_atoms=[n for _, n in described])


def check_compatible(paths: Sequence[Path], headers: Sequence[schema.LatentHeader]) -> None:
    """Refuse latent files of another model, head, layout or dtype than the first."""
    first = headers[0]
    for path, header in zip(paths[1:], headers[1:]):
        for field, what in COMPATIBLE_FIELDS:
            if getattr(header, field) != getattr(first, field):
                raise ProtoalignError(
                    f"{path} and {paths[0]} differ in {what} ({field} {getattr(header, field)!r} vs "
                    f"{getattr(first, field)!r}); prototypes need latents of one model and head"
                )


def check_shards(paths: Sequence[Path], headers: Sequence[schema.LatentHeader]) -> None:
    """Refuse inputs that repeat atoms or miss some: the same file twice, or an incomplete or mixed set of shards.

    Files over the same structure files that are shards (``I/N``, N > 1) must be the shards of one
    N, each I once, all N of them, and come without an unsharded or merged file over those structures.
    """
    resolved = [Path(p).resolve() for p in paths]
    repeated = next((p for i, p in enumerate(paths) if resolved[i] in resolved[:i]), None)
    if repeated is not None:
        raise ProtoalignError(f"latent file {repeated} is given more than once")
    groups: dict[tuple, list[tuple[Path, str]]] = {}
    for path, header in zip(paths, headers):
        groups.setdefault(tuple(header.source_files), []).append((path, header.shard))
    for members in groups.values():
        shards = [shard for _, shard in members if shard not in UNSHARDED]
        if not shards:
            continue
        totals = {shard.split("/")[1] for shard in shards}
        listing = ", ".join(f"{path} ({shard})" for path, shard in members)
        if len(shards) < len(members) or len(totals) > 1 or len(set(shards)) < len(shards):
            raise ProtoalignError(f"these inputs cover the same source files and would repeat atoms: {listing}")
        total = int(totals.pop())
        missing = sorted(set(range(total)) - {int(shard.split("/")[0]) for shard in shards})
        if missing:
            raise ProtoalignError(f"shard(s) {', '.join(f'{i}/{total}' for i in missing)} of the array of "
                                  f"{members[0][0]} are missing (given: {listing}); give every shard")


def _describe(path: Path) -> tuple[schema.LatentHeader, int]:
    """Header and number of atoms of a latent file, checking that its per-atom datasets agree in length."""
    with schema.open_latents(path) as handle:
        try:
            header = schema.LatentHeader.from_attrs(handle.attrs)
            lengths = {handle[name].shape[0] for name in (schema.LATENT, *schema.PER_ATOM_DATASETS)}
        except ProtoalignError as exc:
            raise ProtoalignError(f"latent file {path}: {exc}") from exc
        except Exception as exc:
            raise ProtoalignError(f"latent file {path} is corrupt: {type(exc).__name__}: {exc}") from exc
    if len(lengths) > 1:
        raise ProtoalignError(f"latent file {path} is corrupt: its per-atom datasets differ in length ({sorted(lengths)})")
    n_atoms = lengths.pop()
    if n_atoms == 0:
        raise ProtoalignError(f"latent file {path} holds no atoms")
    return header, n_atoms


def _read(path: Path, read):
    """Run ``read()`` (an HDF5 read of ``path``); a failure becomes a one-line ProtoalignError."""
    try:
        return read()
    except ProtoalignError:
        raise
    except Exception as exc:
        raise ProtoalignError(f"latent file {path} is corrupt: {type(exc).__name__}: {exc}") from exc
