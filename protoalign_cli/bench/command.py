"""How a bench executes programs: ``protoalign`` and console-script command lines, logged subprocesses."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from protoalign_cli.errors import ProtoalignError


def cli_command(*args: str) -> list[str]:
    """The argv that runs ``protoalign ARGS`` (the console script beside this interpreter)."""
    return [executable("protoalign"), *args]


def executable(name: str) -> str:
    """The path of a console script: the one beside this interpreter, else on PATH, else the bare name."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else (shutil.which(name) or name)


def run_logged(argv: list[str], log: Path, cwd: Path | None = None) -> float:
    """Run a command with its output in ``log``; return its wall time (s); ProtoalignError on failure."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(argv) + "\n")
        handle.flush()
        status = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd).returncode
    if status != 0:
        program = f"protoalign {argv[1]}" if Path(argv[0]).name == "protoalign" else Path(argv[0]).name
        raise ProtoalignError(f"{program} failed (exit {status}); see {log}")
    return time.perf_counter() - start
