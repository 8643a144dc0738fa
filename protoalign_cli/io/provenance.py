"""Provenance: file hashes, package versions and the small summary every run writes."""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from protoalign_cli import __version__


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def command_line() -> str:
    """Return the command line of this process, shell-quoted."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def package_version(name: str) -> str:
    """Return an installed package's version, or 'not installed'."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def run_summary(command: str, inputs: dict[str, Any], results: dict[str, Any] | None = None) -> dict:
    """Build the summary of one run: what was asked, with which software, on which machine."""
    return {
        "command": command,
        "command_line": command_line(),
        "inputs": inputs,
        "results": results or {},
        "protoalign_version": __version__,
        "versions": {name: package_version(name) for name in ("mace-torch", "torch", "ase", "faiss-cpu", "h5py", "numpy")},
        "python": platform.python_version(),
        "host": platform.node(),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_summary(path: Path, summary: dict) -> None:
    """Write a run summary as indented JSON (paths and numpy scalars become strings/numbers)."""
    Path(path).write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
