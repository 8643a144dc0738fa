"""Reading structure files with ASE, with clear errors, and choosing shards of them.

Extract makes two passes over its inputs: a quick scan (count the configurations, check every
element against the model, so that bad input fails before any work) and the streaming read of
the selected configurations. For (ext)xyz files the scan reads only the atom-count line and the
species column of each frame, and the read asks ASE for the selected frames only (ASE's extxyz
reader indexes frame starts without parsing them), so neither pass parses a frame twice and a
shard parses only its own frames. Other formats go through ASE for both passes.

Every reader of structures (extract, diagnose, finetune, bench) refuses the same bad input with the
same words: a file without configurations (``empty_file_error``), an element the model lacks
(``check_elements``, naming the symbol), NaN or inf in positions or in the labels it uses
(``non_finite_fields``, naming file and configuration), a label key that no configuration has
(``check_label_keys``, listing the keys the file does have).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

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


def empty_file_error(path: Path | str, role: str = "structure") -> ProtoalignError:
    """The error for a file without configurations, worded alike everywhere (``role``: structure, train, ...)."""
    return ProtoalignError(f"{role} file {path} holds no configurations")


def check_elements(numbers: Iterable[int], known_numbers: set[int], path: Path | str, index: int) -> None:
    """Refuse configuration ``index`` of ``path`` if it holds an element (atomic numbers) the model does not know."""
    unknown = set(int(z) for z in numbers) - known_numbers
    if unknown:
        from ase.data import chemical_symbols

        names = ", ".join(chemical_symbols[z] for z in sorted(unknown))
        raise ProtoalignError(f"{path}, configuration {index}: element(s) {names} not in the model")


def label(atoms, key: str):
    """A configuration's label under ``key``: from ``atoms.info``, ``atoms.arrays`` or its calculator's results
    (where ASE's extxyz reader puts 'energy', 'forces', 'stress'); None when absent."""
    if key in atoms.info:
        return atoms.info[key]
    if key in atoms.arrays:
        return atoms.arrays[key]
    results = getattr(atoms.calc, "results", None) or {}
    return results.get(key)


def label_keys(frames: Iterable) -> list[str]:
    """Every label key of the configurations (info, per-atom arrays but numbers and positions, calculator results)."""
    keys: set[str] = set()
    for atoms in frames:
        keys.update(atoms.info)
        keys.update(k for k in atoms.arrays if k not in ("numbers", "positions"))
        keys.update(getattr(atoms.calc, "results", None) or {})
    return sorted(keys)


def non_finite_fields(values: Mapping[str, object]) -> list[str]:
    """Names of the numeric values (scalars or arrays) that hold NaN or ±inf.

    Absent (None) and non-numeric values (strings, dicts) are skipped; integers are always finite.
    """
    bad = []
    for name, value in values.items():
        try:
            array = np.asarray(value)
        except (TypeError, ValueError):  # ragged or exotic objects are not labels we read
            continue
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad.append(name)
    return bad


def check_finite(atoms, path: Path | str, index: int, keys: Sequence[str] = ()) -> None:
    """Refuse configuration ``index`` of ``path`` if its positions (Å) or its labels ``keys`` hold NaN or inf."""
    bad = non_finite_fields({"positions": atoms.positions, **{key: label(atoms, key) for key in keys}})
    if bad:
        raise non_finite_error(path, index, bad)


def non_finite_error(path: Path | str, index: int, fields: Sequence[str]) -> ProtoalignError:
    """The error for configuration ``index`` of ``path`` whose ``fields`` (positions, labels) hold NaN or inf."""
    return ProtoalignError(f"{path}, configuration {index}: non-finite {', '.join(fields)} (NaN or inf); "
                           "fix or remove that configuration")


def check_label_keys(path: Path | str, frames: Sequence, keys: Mapping[str, str], role: str = "structure") -> None:
    """Refuse a file in which no configuration has the label ``key`` of some ``keys`` item (what → key).

    The error lists the label keys that the file does have, so a mistyped key is easy to correct.
    """
    for what, key in keys.items():
        if not any(label(atoms, key) is not None for atoms in frames):
            raise ProtoalignError(f"{role} file {path} has no {what} key {key!r} in any configuration "
                                  f"(keys: {', '.join(label_keys(frames)) or 'none'})")


def check_every_label(path: Path | str, frames: Sequence, energy_key: str, forces_key: str) -> None:
    """Refuse a configuration without its energy (``atoms.info``) or forces (``atoms.arrays``) label, naming the
    file, the configuration and the label keys it does have (every configuration trained or evaluated needs both)."""
    for index, atoms in enumerate(frames):
        for what, key, labels in (("energy", energy_key, atoms.info), ("forces", forces_key, atoms.arrays)):
            if key not in labels:
                raise ProtoalignError(f"{path}, configuration {index}: no {what} label {key!r} "
                                      f"(keys: {', '.join(label_keys([atoms])) or 'none'})")


def iter_structures(path: Path, index: slice | str = ":", keys: Sequence[str] = (),
                    role: str = "structure") -> Iterator:
    """Yield the ase.Atoms of the configurations of a file ASE can read (all, or an index slice).

    Each is checked to have finite positions and finite labels ``keys`` (``check_finite``). ``role``
    names the file in errors ('structure file', 'train file', ...).
    """
    import ase.io
    from ase.io.formats import string2index

    path = Path(path)
    if not path.is_file():
        raise ProtoalignError(f"{role} file {path} does not exist")
    if path.stat().st_size == 0:
        raise empty_file_error(path, role)
    where = string2index(index) if isinstance(index, str) else index
    numbers = itertools.count(where.start or 0, where.step or 1) if isinstance(where, slice) else itertools.count(where)
    try:
        for number, atoms in zip(numbers, ase.io.iread(path, index=index)):
            check_finite(atoms, path, number, keys)
            yield atoms
    except ProtoalignError:
        raise
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line, whatever the reader raised
        raise ProtoalignError(f"cannot read structures from {path}: {reason}") from exc


def read_structures(path: Path | str, role: str = "structure", keys: Sequence[str] = ()) -> list:
    """Every configuration of a structure file (ase.Atoms), refused when there is none or a value is not finite."""
    frames = list(iter_structures(Path(path), keys=keys, role=role))
    if not frames:
        raise empty_file_error(path, role)
    return frames


def scan_structures(path: Path, known_numbers: set[int], limit: int | None = None) -> int:
    """Count the configurations in a file (at most ``limit``); check every element is one the model knows and
    every position is finite."""
    path = Path(path)
    if not path.is_file():
        raise ProtoalignError(f"structure file {path} does not exist")
    count = None
    if path.suffix.lower() in XYZ_SUFFIXES:
        try:
            count = _checked_count(_xyz_species(path, limit), known_numbers, path, limit)
        except NotPlainXyz:
            pass  # ASE reads it below, and its errors say what is wrong with the file
    if count is None:
        count = _checked_count(([int(z) for z in atoms.numbers] for atoms in iter_structures(path)), known_numbers,
                               path, limit)
    if count == 0:
        raise empty_file_error(path)
    return count


def _checked_count(species: Iterator[list[int]], known_numbers: set[int], path: Path, limit: int | None) -> int:
    """How many frames ``species`` yields (at most ``limit``), each checked for elements the model knows; one
    frame at a time, so memory does not grow with the number of frames."""
    count = 0
    for numbers in species:
        if limit is not None and count == limit:
            break
        check_elements(numbers, known_numbers, path, count)
        count += 1
    return count


_PROPERTIES = re.compile(r"""(?:^|\s)Properties=(?:"([^"]*)"|(\S+))""")


def _atom_columns(comment: str) -> tuple[int, int] | None:
    """Columns of the species and of the first position in an extxyz atom line ((0, 1) for plain xyz);
    None if the line has no species or no position column."""
    match = _PROPERTIES.search(comment)
    if not match:
        return 0, 1
    fields = (match.group(1) or match.group(2)).split(":")
    columns, column = {}, 0
    for name, kind, width in zip(fields[0::3], fields[1::3], fields[2::3]):
        if (name.lower(), kind.upper()) in (("species", "S"), ("pos", "R")):
            columns[name.lower()] = column
        column += int(width)
    if "species" not in columns or "pos" not in columns:
        return None
    return columns["species"], columns["pos"]


def _spells_finite(tokens: Sequence[str]) -> bool:
    """Whether number tokens of a text file spell no NaN or inf (every spelling Python and ASE accept has an 'n').

    A finite spelling too large for a float ('1e999') passes here and is caught by ``check_finite``.
    """
    return "n" not in "".join(tokens).lower()


class NotPlainXyz(Exception):
    """A file the quick (ext)xyz scan does not follow; ASE reads it instead."""


def _xyz_species(path: Path, limit: int | None = None) -> Iterator[list[int]]:
    """The atomic numbers of every frame (the first ``limit``) of an (ext)xyz file, one frame at a time, reading
    only counts, species and positions (refused when not finite, like ``check_finite``).

    Follows ASE's frame layout (count line, comment line, atom lines, optional VEC lines; a blank
    line ends the file). Raises NotPlainXyz whenever the file is anything else, so that the caller falls
    back to ASE, whose error messages then describe the problem.
    """
    from ase.data import atomic_numbers

    count = 0
    try:
        with open(path, encoding="utf-8") as handle:
            line = handle.readline()
            while line.strip() and (limit is None or count < limit):
                natoms = int(line)
                columns = _atom_columns(handle.readline())
                if columns is None:
                    raise NotPlainXyz(path)
                species, position = columns
                numbers, finite = [], True
                for _ in range(natoms):
                    tokens = handle.readline().split()
                    numbers.append(atomic_numbers[tokens[species]])
                    finite = finite and _spells_finite(tokens[position:position + 3])
                if not finite:
                    raise non_finite_error(path, count, ["positions"])
                yield numbers
                count += 1
                line = handle.readline()
                while line.lstrip().startswith("VEC"):
                    line = handle.readline()
    except (ValueError, KeyError, IndexError, UnicodeDecodeError):
        raise NotPlainXyz(path) from None


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
