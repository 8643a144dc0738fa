"""Bench YAML values turned into typed settings (argument lists, frame ranges, integers, paths).

Each helper raises ProtoalignError with one line naming the offending key (``where``).
"""

from __future__ import annotations

from pathlib import Path

from protoalign_cli.errors import ProtoalignError

HARNESS_ARGS = ("--name", "--seed", "--train_file", "--valid_file", "--test_file", "--work_dir",
                "--foundation_model", "--multiheads_finetuning", "--pt_train_file", "--energy_key",
                "--forces_key", "--device")


def read_yaml(path: Path, what: str):
    """The parsed contents of a YAML file (``what`` names it in the error when it is missing, e.g. 'bench config');
    ProtoalignError with one line for a missing file or invalid YAML."""
    import yaml

    if not Path(path).is_file():
        raise ProtoalignError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ProtoalignError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None


def as_args(value, where: str) -> tuple[str, ...]:
    """Turn a YAML list of strings/numbers, or a mapping {--flag: value}, into an argument tuple.

    A mapping key without leading dashes gets ``--``; a value ``true`` makes a bare flag.
    """
    if value is None:
        return ()
    if isinstance(value, dict):
        args: list[str] = []
        for key, item in value.items():
            flag = key if str(key).startswith("-") else f"--{key}"
            args += [str(flag)] if item is True else [str(flag), format_value(item)]
        return tuple(args)
    if isinstance(value, (list, tuple)):
        return tuple(format_value(item) for item in value)
    raise ProtoalignError(f"{where} must be a list of arguments or a mapping of options")


def format_value(item) -> str:
    """One command-line word for a YAML scalar (floats in the shortest form, ``%g``)."""
    if isinstance(item, bool):
        return str(item)
    return f"{item:g}" if isinstance(item, float) else str(item)


def harness_clash(args: tuple[str, ...]) -> list[str]:
    """The arguments among ``args`` that the harness sets itself (HARNESS_ARGS), ``--flag=value`` included."""
    return [arg for arg in args if arg.split("=")[0] in HARNESS_ARGS]


def frame_range(value, where: str, section: str = "split") -> tuple[int, int]:
    """A half-open frame range [start, stop) with 0 <= start < stop."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)
            and 0 <= value[0] < value[1]):
        raise ProtoalignError(f"{section}.{where} must be [start, stop) frame numbers with 0 <= start < stop, got {value!r}")
    return int(value[0]), int(value[1])


def resolve_paths(value, base: Path, where: str) -> tuple[Path, ...]:
    """One path or a list of paths, each resolved relative to ``base`` (``~`` expanded)."""
    items = [value] if isinstance(value, (str, Path)) else list(value or [])
    if not items:
        raise ProtoalignError(f"{where} names no file")
    return tuple((base / Path(item).expanduser()).resolve() for item in items)


def int_list(value, where: str) -> tuple[int, ...]:
    """An integer or a non-empty list of integers, as a tuple."""
    items = [value] if isinstance(value, int) else value
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ProtoalignError(f"{where} must be an integer or a list of integers, got {value!r}")
    return tuple(int(v) for v in items)
