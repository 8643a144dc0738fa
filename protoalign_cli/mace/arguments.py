"""mace_run_train's arguments, the files a run of it writes, and its rank, known before torch is imported.

``mace.tools`` imports torch, e3nn and every model on import (8–20 s), but its argument parser
(``mace/tools/arg_parser.py``) needs only argparse and ``mace/tools/default_keys.py``. Unless
``mace.tools`` is imported already, ``argument_parser`` loads those two files of the installed
mace-torch under a private package name, so that a missing file or an existing run is reported
in about a second. Nothing of MACE is copied: it is MACE's own parser, YAML ``--config`` included.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Sequence

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io.outputs import check_output_folder

_PARSER_PACKAGE = "_protoalign_mace_tools"  # mace/tools/ loaded without its __init__ (which imports torch)


def argument_parser() -> argparse.ArgumentParser:
    """``mace.tools.build_default_arg_parser()``, from mace.tools when imported, else without importing torch."""
    if "mace.tools" not in sys.modules:
        try:
            spec = importlib.util.find_spec("mace")  # finds, does not import, the package
            package = sys.modules.get(_PARSER_PACKAGE) or types.ModuleType(_PARSER_PACKAGE)
            package.__path__ = [str(Path(spec.submodule_search_locations[0]) / "tools")]
            sys.modules[_PARSER_PACKAGE] = package
            return importlib.import_module(f"{_PARSER_PACKAGE}.arg_parser").build_default_arg_parser()
        except (ImportError, AttributeError, TypeError):
            pass  # another layout of mace-torch: its package import below (slow, but the same parser)
    import mace  # noqa: F401  (must precede e3nn)
    from mace.tools import build_default_arg_parser

    return build_default_arg_parser()


def parse_mace_args(mace_args: Sequence[str]) -> argparse.Namespace:
    """Parse mace_run_train arguments with MACE's own parser (YAML ``--config`` included).

    Unknown options and parser errors become a one-line ProtoalignError.
    """
    parser = argument_parser()

    def fail(message: str):
        raise ProtoalignError(f"mace_run_train arguments: {message}")

    parser.error = fail
    args, unknown = parser.parse_known_args(list(mace_args))
    if unknown:
        raise ProtoalignError(
            f"unknown mace_run_train option(s): {' '.join(unknown)} "
            "(protoalign options go before '--', mace_run_train options after it)"
        )
    return args


def output_folders(args: argparse.Namespace) -> dict[str, Path]:
    """The folders mace_run_train writes into, defaulted from ``--work_dir`` as ``mace.tools.check_args`` does."""
    work_dir = Path(args.work_dir)
    return {
        "work_dir": work_dir,
        "model_dir": Path(args.model_dir or work_dir),
        "checkpoints_dir": Path(args.checkpoints_dir or work_dir / "checkpoints"),
        "log_dir": Path(args.log_dir or work_dir / "logs"),
        "results_dir": Path(args.results_dir or work_dir / "results"),
    }


def run_tag(args: argparse.Namespace) -> str:
    """MACE's tag of a run (``mace.tools.get_tag``): '<name>_run-<seed>'."""
    return f"{args.name}_run-{args.seed}"


def final_models(args: argparse.Namespace) -> list[Path]:
    """The models mace_run_train saves at the end: '<name>.model', then stage two's (with --swa) in --model_dir."""
    model_dir = output_folders(args)["model_dir"]
    return [model_dir / f"{args.name}{stage}.model" for stage in ("", "_stagetwo")]


def run_files(args: argparse.Namespace) -> list[Path]:
    """The files of the run '<name>' (seed) that exist now: models, checkpoints, then logs and results.

    Another run into them would mix with them: MACE appends to its log and results files, and its
    final evaluation loads the checkpoint of the highest epoch of the tag, an earlier run's included.
    """
    folders, tag, name = output_folders(args), run_tag(args), args.name
    models = [
        *final_models(args),
        *[folders["model_dir"] / f"{name}{stage}_compiled.model" for stage in ("", "_stagetwo")],
        *[folders["checkpoints_dir"] / f"{tag}{stage}.model" for stage in ("", "_stagetwo")],
    ]
    checkpoints_dir = folders["checkpoints_dir"]
    checkpoints = sorted(checkpoints_dir.glob(f"{glob.escape(tag)}_epoch-*.pt")) if checkpoints_dir.is_dir() else []
    logs = [folders["log_dir"] / f"{tag}.log", folders["log_dir"] / f"{tag}_debug.log",
            folders["results_dir"] / f"{tag}_train.txt"]
    return [path for path in models if path.is_file()] + checkpoints + [path for path in logs if path.is_file()]


def earlier_run(args: argparse.Namespace, own_files: Sequence[Path]) -> list[Path]:
    """What an earlier run left that a run of ``args`` would replace or mix with: ``run_files`` (models
    first), then those of the caller's ``own_files`` (e.g. a run record) that exist."""
    return run_files(args) + [path for path in own_files if path.is_file()]


def check_outputs(args: argparse.Namespace, overwrite: bool, own_files: Sequence[Path]) -> None:
    """Refuse output folders that cannot be written, and an earlier run (``earlier_run``) unless
    ``overwrite`` (replace it) or --restart_latest (resume it). Under DDP rank 0 alone looks for one."""
    if overwrite and args.restart_latest:
        raise ProtoalignError("--overwrite starts the run afresh and mace's --restart_latest resumes it: give one")
    for folder in dict.fromkeys([*output_folders(args).values(), *(Path(path).parent for path in own_files)]):
        check_output_folder(folder)
    earlier = [] if overwrite or args.restart_latest or launch_rank(args)[0] else earlier_run(args, own_files)
    if earlier:
        raise ProtoalignError(f"{earlier[0]} exists: --work_dir {args.work_dir} holds an earlier run; pass "
                              "--overwrite to replace it, or --restart_latest after `--` to resume it")


def launch_rank(args: argparse.Namespace) -> tuple[int, int]:
    """(rank, local rank) of this process as its launcher tells it, read like MACE does before it initialises DDP."""
    if not args.distributed or args.launcher == "none":
        return 0, 0
    names = {
        "slurm": (("SLURM_PROCID", "RANK"), ("SLURM_LOCALID", "LOCAL_RANK")),
        "mpi": (("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_LOCAL_RANK",)),
    }.get(args.launcher, (("RANK",), ("LOCAL_RANK",)))

    def first_set(candidates: tuple[str, ...]) -> int:
        return int(next((os.environ[name] for name in candidates if name in os.environ), 0))

    return first_set(names[0]), first_set(names[1])
