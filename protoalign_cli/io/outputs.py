"""Safe output files: nothing is overwritten by accident and nothing half-written survives."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from protoalign_cli.errors import ProtoalignError


def partial_path(path: Path) -> Path:
    """Return the temporary name under which ``path`` is written until it is complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def check_writable(path: Path, overwrite: bool) -> None:
    """Raise ProtoalignError if ``path`` exists and ``overwrite`` is false, or its folder is missing."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ProtoalignError(f"output {path} exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise ProtoalignError(f"output folder {path.parent} does not exist")


@contextlib.contextmanager
def atomic_output(path: Path, overwrite: bool, keep_on_interrupt: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto ``path`` only when the block succeeds.

    On an exception the temporary file is deleted, so no partial output is left behind. With
    ``keep_on_interrupt`` a KeyboardInterrupt keeps it (so that ``--resume`` can continue).
    """
    path = Path(path)
    check_writable(path, overwrite)
    tmp = partial_path(path)
    try:
        yield tmp
    except KeyboardInterrupt:
        if not keep_on_interrupt:
            _remove(tmp)
        raise
    except BaseException:
        _remove(tmp)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder that replaces the folder ``path`` only when the block succeeds.

    On an exception the temporary folder is deleted; an existing ``path`` (allowed with
    ``overwrite``) is swapped out for the complete new folder and then removed.
    """
    path = Path(path)
    check_writable(path, overwrite)
    tmp, old = partial_path(path), path.with_name(f".{path.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        _remove(old)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
