"""Safe output files: nothing is overwritten by accident, nothing half-written survives, and an output that
cannot be written (missing or read-only folder, a file where a folder should be) is refused before any work."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from protoalign_cli.errors import ProtoalignError


def partial_path(path: Path) -> Path:
    """Return the temporary name under which ``path`` is written until it is complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def check_writable(path: Path, overwrite: bool, file: bool = False) -> None:
    """Raise ProtoalignError unless ``path`` can be written now, before any work is done.

    Refused: an existing ``path`` without ``overwrite``; with ``file``, an existing folder of that
    name (even with ``overwrite``); a missing folder, a parent that is a file, and a folder that
    does not accept new files (tested by creating and removing an empty file in it, which also
    catches read-only file systems and a root user on /sys).
    """
    path = Path(path)
    if file and path.is_dir():
        raise ProtoalignError(f"output {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ProtoalignError(f"output {path} exists; pass --overwrite to replace it")
    folder = path.parent
    blocking = folder if folder.exists() and not folder.is_dir() else _file_among_parents(folder)
    if blocking is not None:
        raise ProtoalignError(f"cannot write {path}: {blocking} is a file, not a folder")
    if not folder.exists():
        raise ProtoalignError(f"output folder {folder} does not exist")
    _check_accepts_files(folder)


def check_output_folder(folder: Path) -> None:
    """Raise ProtoalignError unless the output folder ``folder`` exists and takes new files, or can be made.

    A missing folder is checked at its nearest existing parent (it is made later, with its parents).
    """
    folder = Path(folder)
    blocking = folder if folder.exists() and not folder.is_dir() else _file_among_parents(folder)
    if blocking is not None:
        raise ProtoalignError(f"cannot write into {folder}: {blocking} is a file, not a folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    _check_accepts_files(existing)


def _file_among_parents(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` if it is not a folder (so nothing below it can be made)."""
    for parent in Path(path).parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _check_accepts_files(folder: Path) -> None:
    """Create and remove an empty hidden file in ``folder``; ProtoalignError naming it if that fails."""
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".protoalign-", suffix=".probe", dir=folder)
    except OSError as exc:
        raise ProtoalignError(f"cannot write into {folder}: {exc.strerror or exc}") from None
    os.close(descriptor)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_output(path: Path, overwrite: bool, keep_on_interrupt: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto ``path`` only when the block succeeds.

    On an exception the temporary file is deleted, so no partial output is left behind. With
    ``keep_on_interrupt`` a KeyboardInterrupt keeps it (so that ``--resume`` can continue).
    """
    path = Path(path)
    check_writable(path, overwrite, file=True)
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
