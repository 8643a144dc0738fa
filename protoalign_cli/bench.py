"""``protoalign bench``: a grid of fine-tuning runs (methods x budgets x seeds) and its summary.

One YAML file names the foundation model, the source domain (prototypes, or structures to build
them from), the target data with a time-separated frame split, the budgets N, the seeds, the
mace_run_train hyperparameters shared by every run, and the methods. Every method sees the same
training subset, validation set, test set, seed and hyperparameters: split files are written once
per (N, seed) and reused.

Each run trains with ``mace_run_train`` (or ``protoalign finetune``), then evaluates the model
mace writes (``<name>.model``: the checkpoint with the lowest validation loss, EMA weights when
``--ema``) in float64 on the test and validation sets. A finished run leaves ``done.json`` with its
metrics and is never redone. Energies in eV in files, errors reported in meV, meV/atom and meV/Å.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.outputs import atomic_output
from protoalign_cli.provenance import run_summary, sha256_file, write_summary

METHODS = ("naive", "align", "multihead", "lora", "freeze", "scratch", "select")
HARNESS_ARGS = ("--name", "--seed", "--train_file", "--valid_file", "--test_file", "--work_dir",
                "--foundation_model", "--multiheads_finetuning", "--pt_train_file", "--energy_key",
                "--forces_key", "--device")
CONFIG_KEYS = ("name", "foundation_model", "device", "source", "target", "split", "budgets", "seeds", "mace_args",
               "methods", "baseline", "reuse_runs_from", "notes")
MODEL_NAME = "model"
DONE = "done.json"
CSV_COLUMNS = ("method", "setting", "n_train", "seed", "energy_mae_mev", "energy_rmse_mev",
               "energy_mae_mev_per_atom", "energy_rmse_mev_per_atom", "force_mae_mev_per_a",
               "force_rmse_mev_per_a", "valid_energy_mae_mev", "valid_force_mae_mev_per_a",
               "wall_time_s", "device", "energy_mean_error_mev", "energy_mae_valid_shifted_mev",
               "valid_energy_mae_shifted_mev")
SHIFTED_METRICS = ("energy_mean_error_mev", "energy_mae_valid_shifted_mev", "valid_energy_mae_shifted_mev")
SELECTION_CRITERIA = {"valid_energy_mae_mev": "validation energy MAE",
                      "valid_energy_mae_shifted_mev": "validation energy MAE without its mean (constant offset)"}


# ----------------------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One method entry of a bench config.

    ``kind`` is one of METHODS; ``args`` are extra mace_run_train arguments; for ``align``,
    ``align_weight`` (λ), ``align_args`` (other ``protoalign finetune`` options) and
    ``prototypes_args`` (this method's own ``protoalign prototypes`` options, e.g. K or the
    feature set, applied to the shared source latents instead of source.prototypes_args); for
    ``freeze`` the number of frozen layers; for ``select``, the candidate method names and the
    scope of the choice ('run': per (N, seed); 'budget': per N, by the mean over seeds) and the
    criterion ``select_by`` (a key of SELECTION_CRITERIA).
    """

    name: str
    kind: str
    args: tuple[str, ...] = ()
    align_weight: float | None = None
    align_args: tuple[str, ...] = ()
    prototypes_args: tuple[str, ...] | None = None
    freeze: int | None = None
    candidates: tuple[str, ...] = ()
    scope: str = "run"
    select_by: str = "valid_energy_mae_mev"
    budgets: tuple[int, ...] | None = None
    seeds: tuple[int, ...] | None = None

    @property
    def setting(self) -> str:
        """A short description of this method's own settings (for runs.csv)."""
        if self.kind == "align":
            return " ".join([f"λ={self.align_weight:g}", *self.align_args, *(self.prototypes_args or ()),
                             *self.args]).strip()
        if self.kind == "freeze":
            return " ".join([f"freeze={self.freeze}", *self.args])
        if self.kind == "select":
            return f"lowest {SELECTION_CRITERIA[self.select_by]} per {'(N, seed)' if self.scope == 'run' else 'N'}"
        return " ".join(self.args)


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
    methods: tuple[MethodSpec, ...]
    baseline: str
    source_prototypes: Path | None = None
    source_structures: tuple[Path, ...] = ()
    source_configs_per_file: int | None = None
    source_frames: tuple[int, int] | None = None
    source_extract_args: tuple[str, ...] = ()
    source_prototypes_args: tuple[str, ...] = ()
    reuse_runs_from: tuple[Path, ...] = ()
    notes: str = ""

    def method(self, name: str) -> MethodSpec:
        """The method entry called ``name``."""
        return next(m for m in self.methods if m.name == name)


def _as_args(value, where: str) -> tuple[str, ...]:
    """Turn a YAML list of strings/numbers, or a mapping {--flag: value}, into an argument tuple."""
    if value is None:
        return ()
    if isinstance(value, dict):
        args: list[str] = []
        for key, item in value.items():
            flag = key if str(key).startswith("-") else f"--{key}"
            args += [str(flag)] if item is True else [str(flag), _format_value(item)]
        return tuple(args)
    if isinstance(value, (list, tuple)):
        return tuple(_format_value(item) for item in value)
    raise ProtoalignError(f"{where} must be a list of arguments or a mapping of options")


def _format_value(item) -> str:
    if isinstance(item, bool):
        return str(item)
    return f"{item:g}" if isinstance(item, float) else str(item)


def _range(value, where: str, section: str = "split") -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)
            and 0 <= value[0] < value[1]):
        raise ProtoalignError(f"{section}.{where} must be [start, stop) frame numbers with 0 <= start < stop, got {value!r}")
    return int(value[0]), int(value[1])


def _paths(value, base: Path, where: str) -> tuple[Path, ...]:
    items = [value] if isinstance(value, (str, Path)) else list(value or [])
    if not items:
        raise ProtoalignError(f"{where} names no file")
    return tuple((base / Path(item).expanduser()).resolve() for item in items)


def _ints(value, where: str) -> tuple[int, ...]:
    items = [value] if isinstance(value, int) else value
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ProtoalignError(f"{where} must be an integer or a list of integers, got {value!r}")
    return tuple(int(v) for v in items)


def parse_method(entry: dict, index: int) -> MethodSpec:
    """Parse one ``methods:`` entry of a bench config."""
    if not isinstance(entry, dict) or "method" not in entry:
        raise ProtoalignError(f"methods[{index}] must be a mapping with a 'method' key ({', '.join(METHODS)})")
    kind = entry["method"]
    if kind not in METHODS:
        raise ProtoalignError(f"methods[{index}]: unknown method {kind!r}; choose from {', '.join(METHODS)}")
    known = {"name", "method", "args", "align_weight", "align_args", "prototypes_args", "freeze", "from", "scope", "by", "budgets", "seeds"}
    unknown = set(entry) - known
    if unknown:
        raise ProtoalignError(f"methods[{index}]: unknown key(s) {', '.join(sorted(unknown))}")
    name = str(entry.get("name", kind))
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ProtoalignError(f"methods[{index}]: name {name!r} may hold only letters, digits, '-', '_' and '.'")
    args = _as_args(entry.get("args"), f"methods[{index}].args")
    clash = [a for a in args if a.split("=")[0] in HARNESS_ARGS]
    if clash:
        raise ProtoalignError(f"methods[{index}]: {', '.join(clash)} is set by the harness; remove it")
    spec = dict(name=name, kind=kind, args=args,
                budgets=_ints(entry["budgets"], f"methods[{index}].budgets") if "budgets" in entry else None,
                seeds=_ints(entry["seeds"], f"methods[{index}].seeds") if "seeds" in entry else None)
    if kind == "align":
        try:
            spec["align_weight"] = float(entry["align_weight"])
        except (KeyError, TypeError, ValueError):
            raise ProtoalignError(f"methods[{index}] ({name}): align needs a numeric align_weight") from None
        spec["align_args"] = _as_args(entry.get("align_args"), f"methods[{index}].align_args")
        if "prototypes_args" in entry:
            spec["prototypes_args"] = _as_args(entry["prototypes_args"], f"methods[{index}].prototypes_args")
    if kind == "freeze":
        if not isinstance(entry.get("freeze"), int):
            raise ProtoalignError(f"methods[{index}] ({name}): freeze needs an integer 'freeze' (layers to freeze)")
        spec["freeze"] = int(entry["freeze"])
    if kind == "select":
        candidates = entry.get("from")
        if not candidates or not isinstance(candidates, list):
            raise ProtoalignError(f"methods[{index}] ({name}): select needs 'from', a list of method names")
        scope = entry.get("scope", "run")
        if scope not in ("run", "budget"):
            raise ProtoalignError(f"methods[{index}] ({name}): scope must be 'run' or 'budget'")
        select_by = entry.get("by", "valid_energy_mae_mev")
        if select_by not in SELECTION_CRITERIA:
            raise ProtoalignError(f"methods[{index}] ({name}): by must be one of {', '.join(SELECTION_CRITERIA)}")
        spec.update(candidates=tuple(str(c) for c in candidates), scope=scope, select_by=select_by)
    return MethodSpec(**spec)


def load_config(path: Path, check_files: bool = True) -> BenchConfig:
    """Read and check a bench YAML file; raise ProtoalignError on anything missing or inconsistent.

    ``check_files`` False skips the existence checks of the named files (e.g. prototypes that an
    earlier bench has yet to build).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ProtoalignError(f"bench config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProtoalignError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtoalignError(f"{path} must hold a mapping")
    base = path.resolve().parent
    for key in ("foundation_model", "target", "split", "budgets", "seeds", "methods"):
        if key not in raw:
            raise ProtoalignError(f"{path}: missing key '{key}'")
    unknown = set(raw) - set(CONFIG_KEYS)
    if unknown:
        raise ProtoalignError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(CONFIG_KEYS)}")
    target = raw["target"] if isinstance(raw["target"], dict) else {"files": raw["target"]}
    split_raw = raw["split"] or {}
    split = Split(pool=_range(split_raw.get("pool"), "pool"), valid=_range(split_raw.get("valid"), "valid"),
                  test=_range(split_raw.get("test"), "test"), valid_stride=int(split_raw.get("valid_stride", 1)))
    ranges = sorted([split.pool, split.valid, split.test])
    if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        raise ProtoalignError(f"{path}: split ranges pool/valid/test overlap")
    methods = tuple(parse_method(entry, i) for i, entry in enumerate(raw["methods"] or []))
    if not methods:
        raise ProtoalignError(f"{path}: methods is empty")
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ProtoalignError(f"{path}: method name(s) used twice: {', '.join(duplicates)}; give each a distinct 'name'")
    for method in methods:
        for candidate in method.candidates:
            if candidate not in names or next(m for m in methods if m.name == candidate).kind == "select":
                raise ProtoalignError(f"{path}: select method {method.name} names {candidate!r}, not a trained method")
    baseline = raw.get("baseline") or next((m.name for m in methods if m.kind == "naive"), None)
    if baseline is not None and baseline not in names:
        raise ProtoalignError(f"{path}: baseline {baseline!r} is not a method name")
    budgets, seeds = _ints(raw["budgets"], "budgets"), _ints(raw["seeds"], "seeds")
    pool_size = split.pool[1] - split.pool[0]
    for method in methods:
        too_big = [n for n in (method.budgets or budgets) if not 0 < n <= pool_size]
        if too_big:
            raise ProtoalignError(f"{path}: budget(s) {too_big} outside 1..{pool_size} (the pool size)")
    mace_args = _as_args(raw.get("mace_args"), "mace_args")
    clash = [a for a in mace_args if a.split("=")[0] in HARNESS_ARGS]
    if clash:
        raise ProtoalignError(f"{path}: mace_args {', '.join(clash)} is set by the harness; remove it")
    source = raw.get("source") or {}
    config = BenchConfig(
        path=path.resolve(), name=str(raw.get("name", path.stem)),
        foundation_model=_paths(raw["foundation_model"], base, "foundation_model")[0],
        device=str(raw.get("device", "cpu")),
        target_files=_paths(target.get("files"), base, "target.files"),
        energy_key=str(target.get("energy_key", "REF_energy")), forces_key=str(target.get("forces_key", "REF_forces")),
        split=split, budgets=budgets, seeds=seeds, mace_args=mace_args, methods=methods, baseline=baseline,
        source_prototypes=_paths(source["prototypes"], base, "source.prototypes")[0] if source.get("prototypes") else None,
        source_structures=_paths(source["structures"], base, "source.structures") if source.get("structures") else (),
        source_configs_per_file=source.get("configs_per_file"),
        source_frames=_range(source["frames"], "frames", "source") if "frames" in source else None,
        source_extract_args=_as_args(source.get("extract_args"), "source.extract_args"),
        source_prototypes_args=_as_args(source.get("prototypes_args"), "source.prototypes_args"),
        reuse_runs_from=_paths(raw["reuse_runs_from"], base, "reuse_runs_from") if raw.get("reuse_runs_from") else (),
        notes=str(raw.get("notes") or "").strip(),
    )
    if check_files:
        _check_files(config)
    return config


def _check_files(config: BenchConfig) -> None:
    kinds = {m.kind for m in config.methods}
    files = [config.foundation_model, *config.target_files, *config.source_structures]
    if config.source_prototypes is not None:
        files.append(config.source_prototypes)
    for file in files:
        if not file.is_file():
            raise ProtoalignError(f"{config.path.name}: file {file} does not exist")
    if "align" in kinds and config.source_prototypes is None and not config.source_structures:
        raise ProtoalignError(f"{config.path.name}: align needs source.prototypes or source.structures")
    own = [m.name for m in config.methods if m.prototypes_args is not None]
    if own and not config.source_structures:
        raise ProtoalignError(f"{config.path.name}: {', '.join(own)} set prototypes_args, which needs source.structures "
                              "(their latents are clustered again)")
    if "multihead" in kinds and not config.source_structures:
        raise ProtoalignError(f"{config.path.name}: multihead needs source.structures (replayed with foundation-model labels)")


# ----------------------------------------------------------------------------- pure functions

def training_order(pool_size: int, seed: int) -> np.ndarray:
    """A seeded permutation of pool positions; the first N are the training set of budget N.

    Budgets of one seed are therefore nested (N = 25 is inside N = 50), which makes learning
    curves less noisy; different seeds give independent subsets.
    """
    return np.random.default_rng(seed).permutation(pool_size)


def error_metrics(pred_energy: np.ndarray, ref_energy: np.ndarray, n_atoms: np.ndarray,
                  pred_forces: np.ndarray, ref_forces: np.ndarray) -> dict[str, float]:
    """Energy MAE/RMSE in meV and meV/atom, force MAE/RMSE in meV/Å (all components).

    Energies [n_configs] in eV, ``n_atoms`` [n_configs], forces [n_atoms_total, 3] in eV/Å.
    """
    energy_error = 1000.0 * (np.asarray(pred_energy) - np.asarray(ref_energy))
    per_atom = energy_error / np.asarray(n_atoms)
    force_error = 1000.0 * (np.asarray(pred_forces) - np.asarray(ref_forces)).ravel()
    return {
        "energy_mae_mev": float(np.mean(np.abs(energy_error))),
        "energy_rmse_mev": float(np.sqrt(np.mean(energy_error ** 2))),
        "energy_mae_mev_per_atom": float(np.mean(np.abs(per_atom))),
        "energy_rmse_mev_per_atom": float(np.sqrt(np.mean(per_atom ** 2))),
        "force_mae_mev_per_a": float(np.mean(np.abs(force_error))),
        "force_rmse_mev_per_a": float(np.sqrt(np.mean(force_error ** 2))),
    }


def valid_shifted_energy_mae(test_energy_error: np.ndarray, valid_energy_error: np.ndarray) -> float:
    """Test energy MAE after removing the model's mean validation error (meV in, meV out).

    A constant energy offset is the part of the error a fine-tuned model learns slowest when all
    training data share one composition; shifting by the validation mean (never the test set's)
    shows the error without it.
    """
    return float(np.mean(np.abs(np.asarray(test_energy_error) - np.mean(valid_energy_error))))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1: nan for a single value); (nan, nan) when empty."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def paired_percent_differences(values: dict[int, float], baseline: dict[int, float]) -> list[float]:
    """Per-seed relative difference 100 (value - baseline) / baseline over seeds present in both."""
    return [100.0 * (values[s] - baseline[s]) / baseline[s] for s in sorted(values) if s in baseline]


def select_by_validation(rows: Sequence[dict], candidates: Sequence[str], scope: str,
                         by: str = "valid_energy_mae_mev") -> list[dict]:
    """Pick, among candidate methods' rows, the lowest validation error ``by`` (meV) per (N, seed) or per N.

    ``rows`` are runs.csv rows (dicts with method, n_train, seed and the column ``by``, one of
    SELECTION_CRITERIA). With scope 'run' each (N, seed) takes its own best candidate; with
    'budget' each N takes the candidate with the lowest mean over its seeds, and all that
    candidate's seeds. Returns the chosen rows (copies) with ``chosen`` set to the candidate's
    name. The test set is never used.
    """
    pool = [r for r in rows if r["method"] in candidates]
    chosen = []
    if scope == "run":
        keys = sorted({(r["n_train"], r["seed"]) for r in pool})
        for key in keys:
            group = [r for r in pool if (r["n_train"], r["seed"]) == key]
            chosen.append(min(group, key=lambda r: (r[by], candidates.index(r["method"]))))
    elif scope == "budget":
        for n in sorted({r["n_train"] for r in pool}):
            group = [r for r in pool if r["n_train"] == n]
            means = {m: np.mean([r[by] for r in group if r["method"] == m])
                     for m in candidates if any(r["method"] == m for r in group)}
            best = min(means, key=lambda m: (means[m], candidates.index(m)))
            chosen += [r for r in group if r["method"] == best]
    else:
        raise ProtoalignError(f"unknown selection scope {scope!r}")
    return [{**r, "chosen": r["method"]} for r in chosen]


# ----------------------------------------------------------------------------- runs

@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the grid."""

    index: int
    method: str
    n_train: int
    seed: int

    @property
    def label(self) -> str:
        """Human-readable name, e.g. 'naive N=50 seed=1'."""
        return f"{self.method} N={self.n_train} seed={self.seed}"

    @property
    def key(self) -> str:
        """Folder name of the run below runs/<method>/."""
        return f"N{self.n_train}_seed{self.seed}"


def plan_runs(config: BenchConfig) -> list[Run]:
    """All training runs of the grid, in a fixed order (method, budget, seed); select adds none."""
    runs = []
    for method in config.methods:
        if method.kind == "select":
            continue
        for n in method.budgets or config.budgets:
            for seed in method.seeds or config.seeds:
                runs.append(Run(len(runs), method.name, n, seed))
    return runs


class BenchLayout:
    """Where a bench writes: splits/, source/, runs/<method>/N<N>_seed<s>/, logs/, summaries."""

    def __init__(self, out: Path):
        self.out = Path(out).resolve()

    def run_dir(self, run: Run) -> Path:
        """The work folder of one run."""
        return self.out / "runs" / run.method / run.key

    def lock(self, run: Run) -> Path:
        """The file that marks a run as being run (pid and host of its process)."""
        return self.out / "runs" / run.method / f"{run.key}.lock"

    def log(self, run: Run) -> Path:
        """The log of the bench process that executes one run."""
        return self.out / "logs" / f"{run.method}__{run.key}.log"

    def train_file(self, n_train: int, seed: int) -> Path:
        """The training subset of budget N and seed (extxyz)."""
        return self.out / "splits" / f"N{n_train}_seed{seed}" / "train.xyz"

    @property
    def valid_file(self) -> Path:
        """The validation set (extxyz)."""
        return self.out / "splits" / "valid.xyz"

    @property
    def test_file(self) -> Path:
        """The test set (extxyz)."""
        return self.out / "splits" / "test.xyz"

    @property
    def source_dir(self) -> Path:
        """Cache of the source-domain products (structures, latents, prototypes, pseudolabels)."""
        return self.out / "source"


def read_target_frames(config: BenchConfig) -> list:
    """All frames of the target files (a list of lists of ase.Atoms, one list per file)."""
    from protoalign_cli.structures import iter_structures

    frames = []
    for path in config.target_files:
        atoms_list = list(iter_structures(path))
        split = config.split
        needed = max(split.pool[1], split.valid[1], split.test[1])
        if len(atoms_list) < needed:
            raise ProtoalignError(f"{path} has {len(atoms_list)} frames; the split needs {needed}")
        for i, atoms in enumerate(atoms_list):
            if config.energy_key not in atoms.info or config.forces_key not in atoms.arrays:
                raise ProtoalignError(f"{path}, frame {i}: no {config.energy_key}/{config.forces_key} labels")
        frames.append(atoms_list)
    return frames


def split_frames(config: BenchConfig, frames: list, n_train: int | None, seed: int | None, part: str) -> list:
    """The frames of one part ('train' needs n_train and seed; 'valid'; 'test') over all target files."""
    split = config.split
    if part == "valid":
        return [f for per_file in frames for f in per_file[split.valid[0]:split.valid[1]:split.valid_stride]]
    if part == "test":
        return [f for per_file in frames for f in per_file[split.test[0]:split.test[1]]]
    pool = [f for per_file in frames for f in per_file[split.pool[0]:split.pool[1]]]
    return [pool[i] for i in training_order(len(pool), seed)[:n_train]]


def prepare_splits(config: BenchConfig, layout: BenchLayout, runs: Sequence[Run]) -> None:
    """Write the validation, test and every (N, seed) training file once; existing files are kept."""
    import ase.io

    wanted = sorted({(r.n_train, r.seed) for r in runs})
    paths = [layout.valid_file, layout.test_file, *(layout.train_file(n, s) for n, s in wanted)]
    if all(p.is_file() for p in paths):
        return
    frames = read_target_frames(config)
    parts = [(layout.valid_file, None, None, "valid"), (layout.test_file, None, None, "test")]
    parts += [(layout.train_file(n, s), n, s, "train") for n, s in wanted]
    for path, n, seed, part in parts:
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, overwrite=False) as tmp:
            ase.io.write(tmp, split_frames(config, frames, n, seed, part), format="extxyz")


def cli_command(*args: str) -> list[str]:
    """The argv that runs ``protoalign ARGS`` with this interpreter."""
    return [sys.executable, "-m", "protoalign_cli", *args]


def prototypes_product(method: MethodSpec) -> str:
    """The key in the source products of the prototype file an align method uses."""
    if method.prototypes_args is None:
        return "prototypes"
    return "prototypes-" + hashlib.sha256(json.dumps(method.prototypes_args).encode()).hexdigest()[:12]


def source_products(config: BenchConfig, layout: BenchLayout) -> dict[str, Path]:
    """Paths of the source products the methods need (prototype files, pseudolabelled structures)."""
    products = {}
    for method in config.methods:
        if method.kind == "align":
            key = prototypes_product(method)
            products[key] = (config.source_prototypes if key == "prototypes" and config.source_prototypes
                             else layout.source_dir / f"{key}.h5")
        if method.kind == "multihead":
            products["pseudolabels"] = layout.source_dir / "pseudolabels.xyz"
    return products


def _prototypes_args_of(config: BenchConfig, key: str) -> tuple[str, ...]:
    """The ``protoalign prototypes`` options that build the prototype product ``key``."""
    if key == "prototypes":
        return config.source_prototypes_args
    return next(m.prototypes_args for m in config.methods if m.kind == "align" and prototypes_product(m) == key)


def prepare_source(config: BenchConfig, layout: BenchLayout, say=print) -> dict[str, Path]:
    """Build (once, cached under source/) the source structures, latents, prototypes and pseudolabels."""
    products = source_products(config, layout)
    if all(p.is_file() for p in products.values()):
        return products
    layout.source_dir.mkdir(parents=True, exist_ok=True)
    structures = layout.source_dir / "structures.xyz"
    if config.source_structures and not structures.is_file():
        _write_source_structures(config, structures)
    for key in [k for k, path in products.items() if k.startswith("prototypes") and not path.is_file()]:
        latents = layout.source_dir / "latents.h5"
        if not latents.is_file():
            say(f"source: extracting latents of {config.foundation_model.name} over {structures}")
            _run_logged(cli_command("extract", "--model", str(config.foundation_model), "--configs", str(structures),
                                    "--out", str(latents), "--device", config.device, *config.source_extract_args),
                        layout.source_dir / "extract.log")
        args = _prototypes_args_of(config, key)
        say(f"source: building {key} ({' '.join(args) or 'defaults'})")
        _run_logged(cli_command("prototypes", str(latents), "--out", str(products[key]), *args),
                    layout.source_dir / f"{key}.log")
    if "pseudolabels" in products and not products["pseudolabels"].is_file():
        say(f"source: labelling {structures} with {config.foundation_model.name} (multihead replay)")
        _write_pseudolabels(config, structures, products["pseudolabels"])
    return products


def _write_source_structures(config: BenchConfig, path: Path) -> None:
    """Concatenate the source files: of each, the frames in ``source.frames`` [start, stop) (all when unset),
    of those ``configs_per_file`` evenly spaced ones (all when unset)."""
    import ase.io

    from protoalign_cli.structures import iter_structures

    chosen = []
    for source in config.source_structures:
        frames = list(iter_structures(source))
        if config.source_frames is not None:
            start, stop = config.source_frames
            if len(frames) < stop:
                raise ProtoalignError(f"{source} has {len(frames)} frames; source.frames needs {stop}")
            frames = frames[start:stop]
        if config.source_configs_per_file:
            picks = np.unique(np.linspace(0, len(frames) - 1, min(config.source_configs_per_file, len(frames))).round().astype(int))
            frames = [frames[i] for i in picks]
        chosen += frames
    with atomic_output(path, overwrite=False) as tmp:
        ase.io.write(tmp, chosen, format="extxyz")


def _write_pseudolabels(config: BenchConfig, structures: Path, path: Path) -> None:
    """Label the source structures with the foundation model's energies/forces under the target keys."""
    import ase
    import ase.io

    from protoalign_cli.structures import iter_structures

    calculator = _calculator(config.foundation_model, config.device)
    labelled = []
    for atoms in iter_structures(structures):
        bare = ase.Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        bare.calc = calculator
        energy, forces = bare.get_potential_energy(), bare.get_forces()
        bare.calc = None
        bare.info[config.energy_key] = energy
        bare.arrays[config.forces_key] = forces
        labelled.append(bare)
    with atomic_output(path, overwrite=False) as tmp:
        ase.io.write(tmp, labelled, format="extxyz")


def _run_logged(argv: list[str], log: Path, cwd: Path | None = None) -> float:
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


def training_command(config: BenchConfig, layout: BenchLayout, run: Run, products: dict[str, Path]) -> list[str]:
    """The argv that trains one run (mace_run_train, or protoalign finetune for align)."""
    method = config.method(run.method)
    mace = ["--name", MODEL_NAME, "--seed", str(run.seed), "--work_dir", ".",
            "--train_file", str(layout.train_file(run.n_train, run.seed)), "--valid_file", str(layout.valid_file),
            "--energy_key", config.energy_key, "--forces_key", config.forces_key, "--device", config.device,
            *config.mace_args]
    if method.kind != "scratch":
        mace += ["--foundation_model", str(config.foundation_model)]
    if method.kind == "multihead":
        # mace would otherwise replace --lr by 1e-4 in multihead mode; every method gets the same lr
        mace += ["--multiheads_finetuning", "True", "--pt_train_file", str(products["pseudolabels"]),
                 "--force_mh_ft_lr", "True"]
    elif method.kind != "scratch":
        mace += ["--multiheads_finetuning", "False"]
    if method.kind == "lora":
        mace += ["--lora", "True"]
    if method.kind == "freeze":
        mace += ["--freeze", str(method.freeze)]
    mace += list(method.args)
    if method.kind == "align":
        return cli_command("finetune", "--prototypes", str(products[prototypes_product(method)]),
                           "--align-weight", f"{method.align_weight:g}", *method.align_args, "--", *mace)
    return [_executable("mace_run_train"), *mace]


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else (shutil.which(name) or name)


def run_fingerprint(config: BenchConfig, layout: BenchLayout, run: Run, products: dict[str, Path]) -> str:
    """A hash of everything that defines a run's result: its command and the contents of its files.

    Files (split files, foundation model, source products) enter by content, not by path, so an
    identical run of another bench folder (``reuse_runs_from``) has the same fingerprint.
    """
    used = _products_used(config.method(run.method))
    files = {"train": layout.train_file(run.n_train, run.seed), "valid": layout.valid_file, "test": layout.test_file,
             "foundation_model": config.foundation_model, **{k: v for k, v in products.items() if k in used}}
    placeholders = {str(path): f"<{name}>" for name, path in files.items()}
    parts = {
        "command": [placeholders.get(arg, arg) for arg in training_command(config, layout, run, products)[1:]],
        "files": {name: sha256_file(path) for name, path in files.items()},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _products_used(method: MethodSpec) -> tuple[str, ...]:
    return {"align": (prototypes_product(method),), "multihead": ("pseudolabels",)}.get(method.kind, ())


def read_done(path: Path) -> dict | None:
    """The metrics of a finished run, or None when it has not finished."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def evaluate_model(model_path: Path, atoms_list: Sequence, energy_key: str, forces_key: str, device: str = "cpu") -> dict:
    """Errors of a MACE model (float64) on labelled structures: see ``error_metrics``; plus the
    per-configuration energy errors (meV, ``energy_errors_mev``) and their mean (``energy_mean_error_mev``)."""
    calculator = _calculator(model_path, device)
    energies, ref_energies, n_atoms, forces, ref_forces = [], [], [], [], []
    for atoms in atoms_list:
        ref_energies.append(atoms.info[energy_key])
        ref_forces.append(atoms.arrays[forces_key])
        atoms = atoms.copy()
        atoms.calc = calculator
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
        n_atoms.append(len(atoms))
    errors = 1000.0 * (np.array(energies) - np.array(ref_energies))
    return {**error_metrics(np.array(energies), np.array(ref_energies), np.array(n_atoms),
                            np.concatenate(forces), np.concatenate(ref_forces)),
            "energy_mean_error_mev": float(np.mean(errors)), "energy_errors_mev": errors.tolist()}


def shifted_metrics(test: dict, valid: dict) -> dict:
    """The offset metrics of a run from its test and validation evaluations (``evaluate_model``): the
    test energy MAE after removing the mean validation error, and the validation MAE after removing
    its own mean (what ``select ... by: valid_energy_mae_shifted_mev`` compares)."""
    return {"energy_mean_error_mev": test["energy_mean_error_mev"],
            "energy_mae_valid_shifted_mev": valid_shifted_energy_mae(test["energy_errors_mev"], valid["energy_errors_mev"]),
            "valid_energy_mae_shifted_mev": valid_shifted_energy_mae(valid["energy_errors_mev"], valid["energy_errors_mev"])}


def complete_metrics(config: BenchConfig, layout: BenchLayout, run: Run, say=print) -> None:
    """Add metrics newer than a finished run's done.json by evaluating its model again (training is never redone)."""
    import ase.io

    path = layout.run_dir(run) / DONE
    done = read_done(path)
    if done is None or all(key in done for key in SHIFTED_METRICS):
        return
    origin = Path(done["reused_from"]) / "runs" / run.method / run.key if "reused_from" in done else layout.run_dir(run)
    model_path = origin / f"{MODEL_NAME}.model"
    if not model_path.is_file():
        say(f"{run.label}: {model_path} is gone; its newer metrics stay empty")
        return
    say(f"{run.label}: evaluating again for the validation-shifted energy MAE")
    test = evaluate_model(model_path, ase.io.read(layout.test_file, ":"), config.energy_key, config.forces_key, config.device)
    valid = evaluate_model(model_path, ase.io.read(layout.valid_file, ":"), config.energy_key, config.forces_key, config.device)
    done.update(shifted_metrics(test, valid))
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(done, indent=2) + "\n")


def _calculator(model_path: Path, device: str):
    """A float64 MACECalculator; for multi-head models the fine-tuned 'Default' head."""
    import warnings

    import mace  # noqa: F401
    import torch
    from mace.calculators import MACECalculator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        heads = getattr(torch.load(model_path, map_location="cpu", weights_only=False), "heads", None) or ["Default"]
        head = "Default" if "Default" in heads else heads[0]
        return MACECalculator(model_paths=str(model_path), device=device, default_dtype="float64", head=head)


def device_name(device: str) -> str:
    """A readable name of the device runs train on."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else device
    return f"cpu ({os.cpu_count()} cores)"


def execute_run(config: BenchConfig, layout: BenchLayout, index: int, expected: str | None = None) -> dict:
    """Train and evaluate run ``index`` of the grid (unless done); write its done.json; return it.

    ``expected`` ('<method>/N<N>_seed<s>') guards against a config edited since the index was chosen.
    A lock file (``BenchLayout.lock``) keeps two processes from running the same run.
    """
    runs = plan_runs(config)
    if not 0 <= index < len(runs):
        raise ProtoalignError(f"--run-index {index} is outside 0..{len(runs) - 1}")
    run = runs[index]
    if expected is not None and expected != f"{run.method}/{run.key}":
        raise ProtoalignError(f"run {index} of {config.path.name} is now {run.label}, not {expected}: was the config edited?")
    used = _products_used(config.method(run.method))
    products = {key: path for key, path in source_products(config, layout).items() if key in used}
    missing = [p for p in (layout.train_file(run.n_train, run.seed), layout.valid_file, layout.test_file, *products.values())
               if not p.is_file()]
    if missing:
        raise ProtoalignError(f"{missing[0]} is missing; run `protoalign bench {config.path}` (or with --slurm) first to prepare")
    fingerprint = run_fingerprint(config, layout, run, products)
    folder = layout.run_dir(run)
    done = read_done(folder / DONE)
    if done is not None:
        check_fingerprint(done, fingerprint, folder)
        return done
    with claimed(layout.lock(run), run.label):
        return _train_and_evaluate(config, layout, run, products, fingerprint)


def _train_and_evaluate(config: BenchConfig, layout: BenchLayout, run: Run, products: dict[str, Path], fingerprint: str) -> dict:
    import ase.io

    folder = layout.run_dir(run)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    command = training_command(config, layout, run, products)
    wall = _run_logged(command, folder / "train.log", cwd=folder)
    model_path = folder / f"{MODEL_NAME}.model"
    if not model_path.is_file():
        raise ProtoalignError(f"{run.label}: training finished but wrote no {model_path}")
    start = time.perf_counter()
    test = evaluate_model(model_path, ase.io.read(layout.test_file, ":"), config.energy_key, config.forces_key, config.device)
    valid = evaluate_model(model_path, ase.io.read(layout.valid_file, ":"), config.energy_key, config.forces_key, config.device)
    method = config.method(run.method)
    result = {
        "method": run.method, "kind": method.kind, "setting": method.setting, "n_train": run.n_train, "seed": run.seed,
        **{k: v for k, v in test.items() if k != "energy_errors_mev"}, **shifted_metrics(test, valid),
        "valid_energy_mae_mev": valid["energy_mae_mev"], "valid_force_mae_mev_per_a": valid["force_mae_mev_per_a"],
        "wall_time_s": round(wall, 1), "eval_time_s": round(time.perf_counter() - start, 1),
        "device": device_name(config.device), "evaluated_model": f"{MODEL_NAME}.model (lowest validation loss)",
        "fingerprint": fingerprint, "command": command,
    }
    write_summary(folder / "run_summary.json", run_summary("bench-run", {"config": str(config.path), "run": run.label}, result))
    with atomic_output(folder / DONE, overwrite=False) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def lock_holder(lock: Path) -> str | None:
    """Who is running the run of this lock file ('pid P on HOST'), or None when nobody (or a dead process)."""
    try:
        holder = json.loads(Path(lock).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if holder.get("host") == platform.node():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
    return f"pid {holder.get('pid')} on {holder.get('host')}"


@contextlib.contextmanager
def claimed(lock: Path, label: str):
    """Hold the lock file of a run while the block runs; ProtoalignError if a live process holds it."""
    holder = lock_holder(lock)
    if holder is not None:
        raise ProtoalignError(f"{label} is being run by {holder} (a stale lock on another host: delete {lock})")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise ProtoalignError(f"{label} was claimed by another process just now") from None
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"pid": os.getpid(), "host": platform.node()}, handle)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def check_fingerprint(done: dict, fingerprint: str, folder: Path) -> None:
    """Refuse a finished run whose settings differ from the config's now."""
    if done.get("fingerprint") != fingerprint:
        raise ProtoalignError(
            f"{folder} was finished with different settings (command or split); use another --out, "
            "or delete that folder to redo it"
        )


def reuse_finished(config: BenchConfig, layout: BenchLayout, run: Run, fingerprint: str) -> dict | None:
    """Copy the done.json of an identical finished run from a ``reuse_runs_from`` bench, if any."""
    for other in config.reuse_runs_from:
        done = read_done(other / "runs" / run.method / run.key / DONE)
        if done is not None and done.get("fingerprint") == fingerprint:
            folder = layout.run_dir(run)
            if folder.exists():
                shutil.rmtree(folder)  # what an unfinished attempt left
            folder.mkdir(parents=True)
            done = {**done, "reused_from": str(other)}
            with atomic_output(folder / DONE, overwrite=True) as tmp:
                tmp.write_text(json.dumps(done, indent=2) + "\n")
            return done
    return None


# ----------------------------------------------------------------------------- the grid

def prepare(config: BenchConfig, out: Path, say=print) -> tuple[BenchLayout, list[Run], dict[str, Path]]:
    """Create the output folder, split files and source products; return the layout, runs and products."""
    layout = BenchLayout(out)
    runs = plan_runs(config)
    if any(config.method(r.method).kind == "align" for r in runs):
        from protoalign_cli.cli import main

        if "finetune" not in main.commands or "prototypes" not in main.commands:
            raise ProtoalignError("align needs `protoalign finetune` and `protoalign prototypes`, not in this installation")
    (layout.out / "logs").mkdir(parents=True, exist_ok=True)
    prepare_splits(config, layout, runs)
    products = prepare_source(config, layout, say)
    return layout, runs, products


def run_grid(config: BenchConfig, out: Path, jobs: int = 1, say=print, only: Sequence[str] = ()) -> dict:
    """Run every unfinished run, ``jobs`` at a time (subprocesses), then write the summaries.

    Each run is a ``protoalign bench CONFIG --out OUT --run-index I`` subprocess (as in a SLURM
    array), its output in logs/. ``only``: run just these methods' runs this time (the summaries
    still cover every finished run). Returns {"done", "ran", "failed", "outputs"}.
    """
    if jobs < 1:
        raise ProtoalignError("--jobs must be >= 1")
    trained = [m.name for m in config.methods if m.kind != "select"]
    unknown = [name for name in only if name not in trained]
    if unknown:
        raise ProtoalignError(f"--only {unknown[0]}: not a trained method of {config.path.name} ({', '.join(trained)})")
    layout, runs, products = prepare(config, out, say)
    todo, n_done = [], 0
    for run in runs:
        if only and run.method not in only:
            continue
        fingerprint = run_fingerprint(config, layout, run, products)
        done = read_done(layout.run_dir(run) / DONE)
        if done is None:
            done = reuse_finished(config, layout, run, fingerprint)
            if done is not None:
                say(f"[{run.index + 1}/{len(runs)}] {run.label}: reused from {done.get('reused_from', 'another bench')}")
        holder = lock_holder(layout.lock(run))
        if done is not None:
            check_fingerprint(done, fingerprint, layout.run_dir(run))
            complete_metrics(config, layout, run, say)
            n_done += 1
        elif holder is not None:
            say(f"[{run.index + 1}/{len(runs)}] {run.label}: being run by {holder}, skipped")
        else:
            todo.append(run)
    say(f"{len(runs)} runs{' (' + ', '.join(only) + ' only)' if only else ''}: {n_done} already done, "
        f"{len(todo)} to run, {jobs} at a time")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    failed = _schedule(config, layout, todo, jobs, env, len(runs), say)
    outputs = summarize(config, layout)
    result = {"done": n_done + len(todo) - len(failed), "ran": len(todo) - len(failed), "failed": [r.label for r in failed],
              "outputs": outputs}
    if failed:
        raise ProtoalignError(f"{len(failed)} run(s) failed ({', '.join(r.label for r in failed)}); "
                              f"see {layout.out / 'logs'}; rerun the same command to retry only those")
    return result


def _schedule(config: BenchConfig, layout: BenchLayout, todo: list[Run], jobs: int, env: dict, total: int, say) -> list[Run]:
    """Run ``todo`` as subprocesses, at most ``jobs`` at once; one progress line per state change."""
    pending, active, failed = list(todo), {}, []
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                log = open(layout.log(run), "w")
                argv = cli_command("bench", str(config.path), "--out", str(layout.out), "--run-index", str(run.index),
                                   "--expect-run", f"{run.method}/{run.key}")
                process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                active[run] = (process, log, time.perf_counter())
                say(f"[{run.index + 1}/{total}] {run.label}: running")
            time.sleep(0.2)
            for run, (process, log, start) in list(active.items()):
                if process.poll() is None:
                    continue
                log.close()
                del active[run]
                done = read_done(layout.run_dir(run) / DONE)
                elapsed = time.perf_counter() - start
                if process.returncode == 0 and done is not None:
                    say(f"[{run.index + 1}/{total}] {run.label}: done in {elapsed:.0f} s, test energy MAE "
                        f"{done['energy_mae_mev']:.1f} meV, force MAE {done['force_mae_mev_per_a']:.1f} meV/Å")
                else:
                    failed.append(run)
                    say(f"[{run.index + 1}/{total}] {run.label}: FAILED after {elapsed:.0f} s (see {layout.log(run)})")
    except BaseException:
        for process, log, _ in active.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # the run and the trainer it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            log.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failed


def _terminate(signum, frame):
    raise SystemExit(f"terminated by signal {signum}")


def write_slurm_script(config: BenchConfig, out: Path, say=print, sbatch_options: Sequence[str] = ()) -> Path:
    """Prepare splits and source, then write an array-job script (one task per unfinished run)."""
    layout, runs, _ = prepare(config, out, say)
    todo = [r.index for r in runs if read_done(layout.run_dir(r) / DONE) is None]
    script = layout.out / "bench.sbatch"
    array = ",".join(str(i) for i in todo) or "0"
    lines = ["#!/bin/bash", f"#SBATCH --job-name=bench-{config.name}", f"#SBATCH --array={array}",
             f"#SBATCH --output={layout.out / 'logs'}/slurm-%A_%a.log", *(f"#SBATCH {o}" for o in sbatch_options),
             "# one task per unfinished run; afterwards rerun the same command without --slurm to summarise",
             "set -euo pipefail",
             shlex.join(cli_command("bench", str(config.path), "--out", str(layout.out), "--run-index")) + " $SLURM_ARRAY_TASK_ID",
             ""]
    with atomic_output(script, overwrite=True) as tmp:
        tmp.write_text("\n".join(lines))
    return script


# ----------------------------------------------------------------------------- summaries

def collect_rows(config: BenchConfig, layout: BenchLayout) -> list[dict]:
    """runs.csv rows of every finished run, then the rows of the select methods (within their own budgets and seeds)."""
    rows = []
    for run in plan_runs(config):
        done = read_done(layout.run_dir(run) / DONE)
        if done is not None:
            rows.append({column: done[column] for column in CSV_COLUMNS if column in done})
    for method in config.methods:
        if method.kind == "select":
            within = [r for r in rows if (not method.budgets or r["n_train"] in method.budgets)
                      and (not method.seeds or r["seed"] in method.seeds)]
            for row in select_by_validation(within, list(method.candidates), method.scope, method.select_by):
                rows.append({**row, "method": method.name, "setting": f"{row['chosen']}: {row['setting']}"})
    return rows


def summarize(config: BenchConfig, layout: BenchLayout) -> dict[str, str]:
    """Write runs.csv, summary.md and learning_curve.png from the finished runs; return their paths."""
    rows = collect_rows(config, layout)
    outputs = {"runs_csv": layout.out / "runs.csv", "summary": layout.out / "summary.md",
               "learning_curve": layout.out / "learning_curve.png"}
    with atomic_output(outputs["runs_csv"], overwrite=True) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_output(outputs["summary"], overwrite=True) as tmp:
        tmp.write_text(summary_markdown(config, rows))
    if rows:
        with atomic_output(outputs["learning_curve"], overwrite=True) as tmp:
            plot_learning_curve(rows, [m.name for m in config.methods], tmp)
    return {key: str(path) for key, path in outputs.items()}


def aggregate(rows: Sequence[dict], method: str, n_train: int, baseline: str | None) -> dict:
    """Mean ± sd over seeds of one method at one budget, and paired % differences to the baseline."""
    mine = {r["seed"]: r for r in rows if r["method"] == method and r["n_train"] == n_train}
    base = {r["seed"]: r for r in rows if r["method"] == baseline and r["n_train"] == n_train}
    result = {"n_seeds": len(mine)}
    for column in ("energy_mae_mev", "energy_mae_mev_per_atom", "force_mae_mev_per_a", "valid_energy_mae_mev", "wall_time_s",
                   "energy_mae_valid_shifted_mev", "valid_energy_mae_shifted_mev"):
        result[column] = mean_sd([r[column] for r in mine.values() if column in r])
    for column in ("energy_mae_mev", "force_mae_mev_per_a", "energy_mae_valid_shifted_mev"):
        diffs = paired_percent_differences({s: r[column] for s, r in mine.items() if column in r},
                                           {s: r[column] for s, r in base.items() if column in r})
        result[f"delta_{column}"] = mean_sd(diffs) + (len(diffs),)
    return result


def _pm(pair: tuple, digits: int = 1, sign: bool = False) -> str:
    mean, sd = pair[0], pair[1]
    if math.isnan(mean):
        return "–"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text if math.isnan(sd) else f"{text} ± {sd:.{digits}f}"


def summary_markdown(config: BenchConfig, rows: Sequence[dict]) -> str:
    """The summary table (mean ± sd over seeds per method × N, paired % difference to the baseline)."""
    split = config.split
    lines = [
        f"# Bench {config.name}", "",
        f"Foundation model `{config.foundation_model}`; target {', '.join(f'`{p}`' for p in config.target_files)}; "
        f"time-separated split per file: pool frames [{split.pool[0]}, {split.pool[1]}), validation "
        f"[{split.valid[0]}, {split.valid[1]}) every {split.valid_stride}, test [{split.test[0]}, {split.test[1]}). "
        "Training sets: the first N of a seeded permutation of the pool (nested over N for one seed).",
        "",
        f"Shared mace_run_train arguments: `{' '.join(config.mace_args)}`.",
        "Each run's model is the one mace writes (lowest validation loss; EMA weights with --ema), evaluated in "
        "float64 with MACECalculator on the test set. Errors: mean ± sd over seeds (no sd for one seed); Δ: paired per-seed "
        f"difference to `{config.baseline}` in %, mean ± sd (negative = better). E MAE shifted: the test energy MAE after "
        "subtracting the model's mean validation error, i.e. without a constant offset (chosen without the test set).",
        *(["", config.notes] if config.notes else []),
        "",
        "| method | setting | N | seeds | E MAE (meV) | E MAE (meV/atom) | F MAE (meV/Å) | ΔE vs baseline (%) | ΔF vs baseline (%) "
        "| E MAE shifted (meV) | ΔE shifted (%) | valid E MAE (meV) | valid E MAE shifted (meV) | train time (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in config.methods:
        for n in sorted({r["n_train"] for r in rows if r["method"] == method.name}):
            stats = aggregate(rows, method.name, n, config.baseline)
            is_base = method.name == config.baseline
            setting = method.setting if method.kind != "select" else "see below"
            lines.append(
                f"| {method.name} | {setting or '–'} | {n} | {stats['n_seeds']} | {_pm(stats['energy_mae_mev'])} | "
                f"{_pm(stats['energy_mae_mev_per_atom'], 2)} | {_pm(stats['force_mae_mev_per_a'])} | "
                f"{'–' if is_base else _pm(stats['delta_energy_mae_mev'], sign=True)} | "
                f"{'–' if is_base else _pm(stats['delta_force_mae_mev_per_a'], sign=True)} | "
                f"{_pm(stats['energy_mae_valid_shifted_mev'])} | "
                f"{'–' if is_base else _pm(stats['delta_energy_mae_valid_shifted_mev'], sign=True)} | "
                f"{_pm(stats['valid_energy_mae_mev'], 2)} | {_pm(stats['valid_energy_mae_shifted_mev'], 2)} | "
                f"{stats['wall_time_s'][0]:.0f} |"
            )
    for method in config.methods:
        if method.kind != "select":
            continue
        picks = [r for r in rows if r["method"] == method.name]
        lines += ["", f"`{method.name}` picks among {', '.join(f'`{c}`' for c in method.candidates)} the one with the "
                  f"lowest {SELECTION_CRITERIA[method.select_by]} per "
                  f"{'(N, seed)' if method.scope == 'run' else 'N (mean over seeds)'}; the test set plays no part. Choices:", ""]
        lines += [f"- N={r['n_train']} seed={r['seed']}: {r['chosen']} ({SELECTION_CRITERIA[method.select_by]} "
                  f"{r[method.select_by]:.2f} meV)" for r in sorted(picks, key=lambda r: (r["n_train"], r["seed"]))]
    devices = sorted({str(r.get("device")) for r in rows})
    lines += ["", f"Runs finished: {sum(1 for r in rows if config.method(r['method']).kind != 'select')} "
              f"of {len(plan_runs(config))}; device(s): {', '.join(devices) or '–'}; total training time "
              f"{sum(float(r['wall_time_s']) for r in rows if config.method(r['method']).kind != 'select'):.0f} s.", ""]
    return "\n".join(lines)


def plot_learning_curve(rows: Sequence[dict], methods: Sequence[str], path: Path) -> None:
    """Test energy MAE, energy MAE without the validation offset, and force MAE vs N (log-log), mean ± sd
    over seeds, one line per method (PNG).

    Methods are drawn with distinct markers and a small horizontal offset so identical curves stay visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    columns = {"energy_mae_mev": "test energy MAE (meV)",
               "energy_mae_valid_shifted_mev": "test energy MAE, validation offset removed (meV)",
               "force_mae_mev_per_a": "test force MAE (meV/Å)"}
    figure, axes = plt.subplots(1, len(columns), figsize=(15, 4))
    drawn = [m for m in methods if any(r["method"] == m for r in rows)]
    for position, method in enumerate(drawn):
        budgets = sorted({r["n_train"] for r in rows if r["method"] == method})
        offset = 1.0 + 0.015 * (position - (len(drawn) - 1) / 2)
        for axis, column in zip(axes, columns):
            stats = [mean_sd([r[column] for r in rows if r["method"] == method and r["n_train"] == n and column in r])
                     for n in budgets]
            axis.errorbar([n * offset for n in budgets], [s[0] for s in stats], yerr=[np.nan_to_num(s[1]) for s in stats],
                          marker="osD^vP*X"[position % 8], linestyle=("-", "--", ":", "-.")[position % 4], capsize=3,
                          label=method)
    for axis, label in zip(axes, columns.values()):
        axis.set_xscale("log")
        axis.set_yscale("log")
        for scale in (axis.xaxis, axis.yaxis):
            scale.set_major_formatter(ScalarFormatter())
            scale.set_minor_formatter(ScalarFormatter())
        axis.set_xlabel("training configurations N")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
    plt.close(figure)
