"""Where a bench writes and how it keeps track of runs: the grid of runs, run folders, each run's
training command, done.json, lock files, fingerprints and the reuse of identical finished runs
from other bench folders."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from protoalign_cli.bench import DEFAULT_OUT_ROOT
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io.outputs import atomic_output
from protoalign_cli.io.provenance import sha256_file

if TYPE_CHECKING:
    from protoalign_cli.bench.config import BenchConfig

DONE = "done.json"
MODEL_NAME = "model"


def trained_model(folder: Path) -> Path:
    """The model mace ends a run with: its stage-two model when the run had a stage two (``--swa``), else its
    model of lowest validation loss."""
    stage_two = Path(folder) / f"{MODEL_NAME}_stagetwo.model"
    return stage_two if stage_two.is_file() else Path(folder) / f"{MODEL_NAME}.model"


def refit_model(folder: Path) -> Path:
    """Where a run's trained model is saved after its offset refit."""
    return Path(folder) / f"{MODEL_NAME}_refit.model"


def final_model(folder: Path) -> Path:
    """The model a run is evaluated on: the refit model when the method refits the offset, else ``trained_model``."""
    refit = refit_model(folder)
    return refit if refit.is_file() else trained_model(folder)


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
    """All training runs of the grid, in a fixed order (method, budget, seed); methods that train nothing add none."""
    runs = []
    for method in config.methods:
        if not method.trains:
            continue
        for n in method.budgets or config.budgets:
            for seed in method.seeds or config.seeds:
                runs.append(Run(len(runs), method.name, n, seed))
    return runs


def default_out(config: BenchConfig) -> Path:
    """The output folder of a bench when none is given: bench_runs/<name>."""
    return DEFAULT_OUT_ROOT / config.name


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


def read_done(path: Path) -> dict | None:
    """The metrics of a finished run, or None when it has not finished."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_done(path: Path, done: dict, overwrite: bool) -> None:
    """Write a run's done.json (indented JSON) atomically."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(done, indent=2) + "\n")


def shared_arguments(seed: int, train_file: Path, valid_file: Path, energy_key: str, forces_key: str, device: str,
                     mace_args: Sequence[str]) -> list[str]:
    """The mace_run_train arguments every training of a bench or a tune starts with: the model's name, the seed,
    the work folder (the one it runs in), the data files and their label keys, the device, the shared recipe."""
    return ["--name", MODEL_NAME, "--seed", str(seed), "--work_dir", ".", "--train_file", str(train_file),
            "--valid_file", str(valid_file), "--energy_key", energy_key, "--forces_key", forces_key, "--device", device,
            *mace_args]


def harness_arguments(config: BenchConfig, layout: BenchLayout, run: Run) -> list[str]:
    """The mace_run_train arguments every method shares: name, seed, split files, keys, device, mace_args."""
    return shared_arguments(run.seed, layout.train_file(run.n_train, run.seed), layout.valid_file, config.energy_key,
                            config.forces_key, config.device, config.mace_args)


def training_command(config: BenchConfig, layout: BenchLayout, run: Run, products: dict[str, Path]) -> list[str]:
    """The argv that trains one run (mace_run_train, or protoalign finetune for align).

    ``products`` maps source-product keys to paths (at least those the run's method uses).
    """
    method = config.method(run.method)
    arguments = [*harness_arguments(config, layout, run), *method.mace_arguments(config, products)]
    return method.command(arguments, products)


def fingerprint(argv: Sequence[str], files: Mapping[str, Path], extra: Mapping | None = None) -> str:
    """A hash of what defines a training's result: its command and the contents of its ``files`` (name -> path).

    Files enter by content, not by path: in the command each file's path reads ``<name>``, so an identical
    training in another folder has the same fingerprint. The program enters by name (``protoalign`` as
    ``-m protoalign_cli``, as it was first run). ``extra``: more settings that define the result.
    """
    placeholders = {str(path): f"<{name}>" for name, path in files.items()}
    # the program enters by name; ``protoalign`` as it was first run (``python -m protoalign_cli``): runs stay valid
    command = ["-m", "protoalign_cli", *argv[1:]] if Path(argv[0]).name == "protoalign" else list(argv[1:])
    parts = {
        "command": [placeholders.get(arg, arg) for arg in command],
        "files": {name: sha256_file(path) for name, path in files.items()},
        **(extra or {}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def run_fingerprint(config: BenchConfig, layout: BenchLayout, run: Run, products: dict[str, Path],
                    with_refit: bool = True) -> str:
    """The ``fingerprint`` of a run: its training command and files (split files, foundation model, the source
    products its method reads).

    An identical run of another bench folder (``reuse_runs_from``) has the same fingerprint. ``products`` maps
    source-product keys to paths (at least the method's). Without ``with_refit`` it is the fingerprint of the
    run's training alone (as if it did not refit the offset).
    """
    used = config.method(run.method).source_products(config, layout.source_dir)
    files = {"train": layout.train_file(run.n_train, run.seed), "valid": layout.valid_file, "test": layout.test_file,
             "foundation_model": config.foundation_model, **{k: v for k, v in products.items() if k in used}}
    refit = with_refit and config.method(run.method).refit_offset  # absent otherwise: earlier fingerprints stay valid
    return fingerprint(training_command(config, layout, run, products), files, {"refit_offset": True} if refit else None)


def check_fingerprint(done: dict, fingerprint: str, folder: Path) -> None:
    """Refuse a finished run whose settings differ from the config's now."""
    if done.get("fingerprint") != fingerprint:
        raise ProtoalignError(
            f"{folder} was finished with different settings (command or split); use another --out, "
            "or delete that folder to redo it"
        )


def reuse_finished(config: BenchConfig, layout: BenchLayout, run: Run, fingerprint: str) -> dict | None:
    """Copy the done.json of an identical finished run from a ``reuse_runs_from`` bench, if any.

    Identical means the same fingerprint (the same training on the same files), whatever the entry's name
    there; the entry of this run's name is looked at first. ``reused_run`` records which one it was.
    """
    for other in config.reuse_runs_from:
        paths = [other / "runs" / run.method / run.key / DONE, *sorted((other / "runs").glob(f"*/{run.key}/{DONE}"))]
        for path in paths:
            done = read_done(path)
            if done is None or done.get("fingerprint") != fingerprint:
                continue
            folder = layout.run_dir(run)
            if folder.exists():
                shutil.rmtree(folder)  # what an unfinished attempt left
            folder.mkdir(parents=True)
            done = {**done, "method": run.method, "reused_from": str(other),
                    "reused_run": path.parent.relative_to(other / "runs").as_posix()}
            write_done(folder / DONE, done, overwrite=True)
            return done
    return None


def trained_twin(layout: BenchLayout, run: Run, training_fingerprint: str) -> Path | None:
    """The folder of a finished run of this bench, of another entry, whose training is this run's
    (its fingerprint is ``training_fingerprint``): an entry that only adds the offset refit reuses it."""
    for done_path in sorted((layout.out / "runs").glob(f"*/{run.key}/{DONE}")):
        done = read_done(done_path)
        if done_path.parent != layout.run_dir(run) and done is not None and done.get("fingerprint") == training_fingerprint \
                and trained_model(done_path.parent).is_file():
            return done_path.parent
    return None


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
