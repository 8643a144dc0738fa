"""A bench YAML file read into a checked ``BenchConfig``: one ``Error:`` line for any bad config,
before anything runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from protoalign_cli.bench.methods import REGISTRY, Method, parse_method
from protoalign_cli.bench.values import as_args, frame_range, harness_clash, int_list, read_yaml, resolve_paths
from protoalign_cli.errors import ProtoalignError

CONFIG_KEYS = ("name", "foundation_model", "device", "source", "target", "split", "budgets", "seeds", "mace_args",
               "methods", "baseline", "reuse_runs_from", "notes")
REQUIRED_KEYS = ("foundation_model", "target", "split", "budgets", "seeds", "methods")
DEFAULT_DEVICE = "cpu"
DEFAULT_BASELINE_KIND = "naive"
DEFAULT_ENERGY_KEY = "REF_energy"
DEFAULT_FORCES_KEY = "REF_forces"


@dataclasses.dataclass(frozen=True)
class Split:
    """Half-open frame ranges [start, stop) of every target file; validation frames every ``valid_stride``."""

    pool: tuple[int, int]
    valid: tuple[int, int]
    test: tuple[int, int]
    valid_stride: int = 1


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A parsed bench YAML file (paths resolved relative to the file's folder)."""

    path: Path
    name: str
    foundation_model: Path
    device: str
    target_files: tuple[Path, ...]
    energy_key: str
    forces_key: str
    split: Split
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    mace_args: tuple[str, ...]
    methods: tuple[Method, ...]
    baseline: str
    source_prototypes: Path | None = None
    source_structures: tuple[Path, ...] = ()
    source_configs_per_file: int | None = None
    source_frames: tuple[int, int] | None = None
    source_extract_args: tuple[str, ...] = ()
    source_prototypes_args: tuple[str, ...] = ()
    reuse_runs_from: tuple[Path, ...] = ()
    notes: str = ""

    def method(self, name: str) -> Method:
        """The method entry called ``name``."""
        return next(m for m in self.methods if m.name == name)


def load_config(path: Path, check_files: bool = True) -> BenchConfig:
    """Read and check a bench YAML file; raise ProtoalignError on anything missing or inconsistent.

    ``check_files`` False skips the existence checks of the named files (e.g. prototypes that an
    earlier bench has yet to build).
    """
    path = Path(path)
    raw = _read_mapping(path)
    base = path.resolve().parent
    target = raw["target"] if isinstance(raw["target"], dict) else {"files": raw["target"]}
    split = _parse_split(raw["split"] or {}, path)
    methods = _parse_methods(raw["methods"] or [], path)
    names = [m.name for m in methods]
    baseline = raw.get("baseline") or next((m.name for m in methods if m.kind == DEFAULT_BASELINE_KIND), None)
    if baseline is not None and baseline not in names:
        raise ProtoalignError(f"{path}: baseline {baseline!r} is not a method name")
    budgets, seeds = int_list(raw["budgets"], "budgets"), int_list(raw["seeds"], "seeds")
    _check_budgets(methods, budgets, split, path)
    mace_args = as_args(raw.get("mace_args"), "mace_args")
    clash = harness_clash(mace_args)
    if clash:
        raise ProtoalignError(f"{path}: mace_args {', '.join(clash)} is set by the harness; remove it")
    config = BenchConfig(
        path=path.resolve(), name=str(raw.get("name", path.stem)),
        foundation_model=resolve_paths(raw["foundation_model"], base, "foundation_model")[0],
        device=str(raw.get("device", DEFAULT_DEVICE)),
        target_files=resolve_paths(target.get("files"), base, "target.files"),
        energy_key=str(target.get("energy_key", DEFAULT_ENERGY_KEY)),
        forces_key=str(target.get("forces_key", DEFAULT_FORCES_KEY)),
        split=split, budgets=budgets, seeds=seeds, mace_args=mace_args, methods=methods, baseline=baseline,
        **_source_fields(raw.get("source") or {}, base),
        reuse_runs_from=resolve_paths(raw["reuse_runs_from"], base, "reuse_runs_from") if raw.get("reuse_runs_from") else (),
        notes=str(raw.get("notes") or "").strip(),
    )
    if check_files:
        _check_files(config)
    return config


def _read_mapping(path: Path) -> dict:
    """The YAML mapping of a bench file, with every required key and no unknown one."""
    raw = read_yaml(path, "bench config")
    if not isinstance(raw, dict):
        raise ProtoalignError(f"{path} must hold a mapping")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise ProtoalignError(f"{path}: missing key '{key}'")
    unknown = set(raw) - set(CONFIG_KEYS)
    if unknown:
        raise ProtoalignError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(CONFIG_KEYS)}")
    return raw


def _parse_split(raw: dict, path: Path) -> Split:
    """The ``split:`` section; its three ranges must not overlap."""
    split = Split(pool=frame_range(raw.get("pool"), "pool"), valid=frame_range(raw.get("valid"), "valid"),
                  test=frame_range(raw.get("test"), "test"), valid_stride=int(raw.get("valid_stride", 1)))
    ranges = sorted([split.pool, split.valid, split.test])
    if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        raise ProtoalignError(f"{path}: split ranges pool/valid/test overlap")
    return split


def _parse_methods(entries: list, path: Path) -> tuple[Method, ...]:
    """The ``methods:`` list: at least one, distinct names, references to other entries checked."""
    methods = tuple(variant for index, entry in enumerate(entries) for variant in parse_method(entry, index).variants())
    if not methods:
        raise ProtoalignError(f"{path}: methods is empty")
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ProtoalignError(f"{path}: method name(s) used twice: {', '.join(duplicates)}; give each a distinct 'name'")
    for method in methods:
        method.check_references(methods, str(path))
    return methods


def _check_budgets(methods: tuple[Method, ...], budgets: tuple[int, ...], split: Split, path: Path) -> None:
    """Every budget N of every method must fit in the pool (1 <= N <= pool size)."""
    pool_size = split.pool[1] - split.pool[0]
    for method in methods:
        too_big = [n for n in (method.budgets or budgets) if not 0 < n <= pool_size]
        if too_big:
            raise ProtoalignError(f"{path}: budget(s) {too_big} outside 1..{pool_size} (the pool size)")


def _source_fields(source: dict, base: Path) -> dict:
    """BenchConfig's source_* fields from the ``source:`` section."""
    return dict(
        source_prototypes=resolve_paths(source["prototypes"], base, "source.prototypes")[0] if source.get("prototypes") else None,
        source_structures=resolve_paths(source["structures"], base, "source.structures") if source.get("structures") else (),
        source_configs_per_file=source.get("configs_per_file"),
        source_frames=frame_range(source["frames"], "frames", "source") if "frames" in source else None,
        source_extract_args=as_args(source.get("extract_args"), "source.extract_args"),
        source_prototypes_args=as_args(source.get("prototypes_args"), "source.prototypes_args"),
    )


def _check_files(config: BenchConfig) -> None:
    """The named files exist, and the source holds what each method kind needs."""
    files = [config.foundation_model, *config.target_files, *config.source_structures]
    if config.source_prototypes is not None:
        files.append(config.source_prototypes)
    for file in files:
        if not file.is_file():
            raise ProtoalignError(f"{config.path.name}: file {file} does not exist")
    for kind, method_class in REGISTRY.items():
        of_kind = [m for m in config.methods if m.kind == kind]
        if of_kind:
            method_class.check_sources(config, of_kind)
