"""Reading structure files with ASE, with clear errors, and choosing shards of them.

Extract makes two passes over its inputs: a quick scan (count the configurations, check every
element against the model, so that bad input fails before any work) and the streaming read of
the selected configurations. For (ext)xyz files the scan reads only the atom-count line and the
species column of each frame, and the read asks ASE for the selected frames only (ASE's extxyz
reader indexes frame starts without parsing them), so neither pass parses a frame twice and a
shard parses only its own frames. Other formats go through ASE for both passes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from protoalign_cli.errors import ProtoalignError

XYZ_SUFFIXES = (".xyz", ".extxyz")


def parse_shard(text: str | None) -> tuple[int, int]:
    """Parse 'I/N' (0 <= I < N) into (I, N); None means the whole input, (0, 1)."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ProtoalignError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ProtoalignError(f"--shard {text}: need N >= 1 and 0 <= I < N")
    return index, count


def iter_structures(path: Path, index: slice | str = ":") -> Iterator:
    """Yield the ase.Atoms of the configurations of a file ASE can read (all, or an index slice)."""
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise ProtoalignError(f"structure file {path} does not exist")
    try:
        yield from ase.io.iread(path, index=index)
    except ProtoalignError:
        raise
    except Exception as exc:
        raise ProtoalignError(f"cannot read structures from {path}: {type(exc).__name__}: {exc}") from exc


def scan_structures(path: Path, known_numbers: set[int], limit: int | None = None) -> int:
    """Count the configurations in a file (at most ``limit``) and check every element is one the model knows."""
    path = Path(path)
    if not path.is_file():
        raise ProtoalignError(f"structure file {path} does not exist")
    species = _xyz_species(path, limit) if path.suffix.lower() in XYZ_SUFFIXES else None
    if species is None:
        species = ([int(z) for z in atoms.numbers] for atoms in iter_structures(path))
    count = 0
    for numbers in species:
        if limit is not None and count == limit:
            break
        unknown = set(numbers) - known_numbers
        if unknown:
            from ase.data import chemical_symbols

            names = ", ".join(chemical_symbols[z] for z in sorted(unknown))
            raise ProtoalignError(f"{path}, configuration {count}: element(s) {names} not in the model")
        count += 1
    if count == 0:
        raise ProtoalignError(f"{path} holds no configurations")
    return count


_PROPERTIES = re.compile(r"""(?:^|\s)Properties=(?:"([^"]*)"|(\S+))""")


def _species_column(comment: str) -> int | None:
    """Column of the species in an extxyz atom line (0 for plain xyz); None if the line has no species column."""
    match = _PROPERTIES.search(comment)
    if not match:
        return 0
    fields = (match.group(1) or match.group(2)).split(":")
    column = 0
    for name, kind, width in zip(fields[0::3], fields[1::3], fields[2::3]):
        if name.lower() == "species" and kind.upper() == "S":
            return column
        column += int(width)
    return None


def _xyz_species(path: Path, limit: int | None = None) -> list[list[int]] | None:
    """Atomic numbers of every frame (the first ``limit``) of an (ext)xyz file, reading only counts and species.

    Follows ASE's frame layout (count line, comment line, atom lines, optional VEC lines; a blank
    line ends the file). Returns None whenever the file is anything else, so that the caller falls
    back to ASE, whose error messages then describe the problem.
    """
    from ase.data import atomic_numbers

    frames = []
    try:
        with open(path, encoding="utf-8") as handle:
            line = handle.readline()
            while line.strip() and (limit is None or len(frames) < limit):
                natoms = int(line)
                column = _species_column(handle.readline())
                if column is None:
                    return None
                numbers = []
                for _ in range(natoms):
                    numbers.append(atomic_numbers[handle.readline().split()[column]])
                frames.append(numbers)
                line = handle.readline()
                while line.lstrip().startswith("VEC"):
                    line = handle.readline()
    except (ValueError, KeyError, IndexError, UnicodeDecodeError):
        return None
    return frames


def selected_indices(n_configs: int, shard: tuple[int, int], max_configs: int | None) -> range:
    """Global configuration indices (over all files in order) taken by a shard, capped at max_configs.

    The first ``max_configs`` configurations are kept, then every N-th from I (shard I/N).
    """
    index, count = shard
    return range(min(n_configs, max_configs if max_configs is not None else n_configs))[index::count]


def iter_selected(configs: list[Path], counts: list[int], selection: range) -> Iterator[tuple[int, int, object]]:
    """Yield (file index, configuration index within the file, atoms) for the selected global indices.

    ``selection`` is a slice of ``selected_indices`` (e.g. what is left to do on resume). Each file
    is asked only for its selected frames; a file holding none is not opened.
    """
    import bisect

    offset = 0
    for file_index, (path, count) in enumerate(zip(configs, counts)):
        inside = selection[bisect.bisect_left(selection, offset):bisect.bisect_left(selection, offset + count)]
        if inside:
            local = range(inside.start - offset, inside.stop - offset, inside.step)
            frames = iter_structures(path, slice(local.start, local.stop, local.step))
            read = 0
            for config_index, atoms in zip(local, frames):
                read += 1
                yield file_index, config_index, atoms
            if read < len(local):
                raise ProtoalignError(f"{path} changed while being read: fewer configurations than counted")
        offset += count
