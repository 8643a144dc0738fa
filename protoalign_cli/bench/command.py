"""What a bench executes: ``protoalign`` and ``mace_run_train`` command lines, logged subprocesses,
and the training command of a run (the harness's arguments, then its method's)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from protoalign_cli.errors import ProtoalignError

if TYPE_CHECKING:
    from protoalign_cli.bench.config import BenchConfig
    from protoalign_cli.bench.layout import BenchLayout, Run

MODEL_NAME = "model"


def cli_command(*args: str) -> list[str]:
    """The argv that runs ``protoalign ARGS`` with this interpreter."""
    return [sys.executable, "-m", "protoalign_cli", *args]


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
        program = f"protoalign {argv[3]}" if argv[1:3] == ["-m", "protoalign_cli"] else Path(argv[0]).name
        raise ProtoalignError(f"{program} failed (exit {status}); see {log}")
    return time.perf_counter() - start


def harness_arguments(config: BenchConfig, layout: BenchLayout, run: Run) -> list[str]:
    """The mace_run_train arguments every method shares: name, seed, split files, keys, device, mace_args."""
    return ["--name", MODEL_NAME, "--seed", str(run.seed), "--work_dir", ".",
            "--train_file", str(layout.train_file(run.n_train, run.seed)), "--valid_file", str(layout.valid_file),
            "--energy_key", config.energy_key, "--forces_key", config.forces_key, "--device", config.device,
            *config.mace_args]


def training_command(config: BenchConfig, layout: BenchLayout, run: Run, products: dict[str, Path]) -> list[str]:
    """The argv that trains one run (mace_run_train, or protoalign finetune for align).

    ``products`` maps source-product keys to paths (at least those the run's method uses).
    """
    method = config.method(run.method)
    arguments = [*harness_arguments(config, layout, run), *method.mace_arguments(config, products)]
    return method.command(arguments, products)
