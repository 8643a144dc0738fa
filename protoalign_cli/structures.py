"""Reading structure files with ASE, with clear errors, and choosing shards of them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from protoalign_cli.errors import ProtoalignError


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


def iter_structures(path: Path) -> Iterator:
    """Yield the ase.Atoms of every configuration in a file ASE can read (extxyz first)."""
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise ProtoalignError(f"structure file {path} does not exist")
    try:
        yield from ase.io.iread(path, index=":")
    except ProtoalignError:
        raise
    except Exception as exc:
        raise ProtoalignError(f"cannot read structures from {path}: {type(exc).__name__}: {exc}") from exc


def scan_structures(path: Path, known_numbers: set[int]) -> int:
    """Count the configurations in a file and check every element is one the model knows."""
    count = 0
    for atoms in iter_structures(path):
        unknown = set(int(z) for z in atoms.numbers) - known_numbers
        if unknown:
            from ase.data import chemical_symbols

            names = ", ".join(chemical_symbols[z] for z in sorted(unknown))
            raise ProtoalignError(f"{path}, configuration {count}: element(s) {names} not in the model")
        count += 1
    if count == 0:
        raise ProtoalignError(f"{path} holds no configurations")
    return count


def selected_indices(n_configs: int, shard: tuple[int, int], max_configs: int | None) -> list[int]:
    """Configuration indices of a file taken by a shard (every N-th from I), capped at max_configs."""
    index, count = shard
    chosen = list(range(n_configs))[: max_configs if max_configs is not None else n_configs]
    return chosen[index::count]
