"""Where a tune writes and what it trains: the output folders, the tasks, each task's command and fingerprint.

A task is one training on one fold. Candidates whose trainings are the same (a candidate and its ``refit_offset``
twin; recipes that --max-epochs makes equal) share a task: it trains once, in the first one's folder, and evaluates each of them
(the twin on its refit copy). Tasks are numbered candidate by candidate, fold by fold; with --folds, the
winner's final retrain on every configuration is one more task after them (fold 'all').
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from protoalign_cli.bench.layout import DONE, fingerprint, shared_arguments
from protoalign_cli.bench.methods import Method
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.tune.candidates import (MAX_EPOCHS, PATIENCE, CandidateSet, active_candidates, cap_epochs,
                                            for_epochs, is_alignment, mace_default, parse_candidates)
from protoalign_cli.tune.choose import RETRAIN_FOLD
from protoalign_cli.tune.data import fold_names
from protoalign_cli.tune.settings import TuneSettings, read_record, settings_from_record

TRAIN_FILE, VALID_FILE = "train.xyz", "valid.xyz"  # a fold's split files
SEED = 0  # every training of a tune: one seed, the same for every candidate and fold
NO_GAIN = "expect no gain"  # what protoalign diagnose's verdict says when the alignment cannot help the energies


@dataclasses.dataclass(frozen=True)
class Task:
    """One training on one fold (``fold``: 'holdout', 'fold1'.., or 'all'), evaluated for each of ``candidates``
    (the first one's folder holds the training)."""

    index: int
    fold: str
    candidates: tuple[str, ...]

    @property
    def trainer(self) -> str:
        """The candidate whose folder holds the training."""
        return self.candidates[0]

    @property
    def label(self) -> str:
        """Human-readable name, e.g. 'lr3e-3 + lr3e-3_refit, fold2'."""
        return f"{' + '.join(self.candidates)}, {self.fold}"


class TuneLayout:
    """Where a tune writes: tune.json, splits/<fold>/, candidates/<name>/<fold>/, logs/, diagnose/, best.model."""

    def __init__(self, out: Path):
        self.out = Path(out).resolve()

    def train_file(self, fold: str) -> Path:
        """The training configurations of a fold (extxyz)."""
        return self.out / "splits" / fold / TRAIN_FILE

    def valid_file(self, fold: str) -> Path:
        """The validation configurations of a fold; for the final retrain its training file (mace needs one;
        it only logs there)."""
        return self.train_file(fold) if fold == RETRAIN_FOLD else self.out / "splits" / fold / VALID_FILE

    def task_dir(self, candidate: str, fold: str) -> Path:
        """The folder of a candidate on a fold: done.json, and mace's files when the training is its own."""
        return self.out / "candidates" / candidate / fold

    def lock(self, task: Task) -> Path:
        """The file that marks a task as being run (pid and host of its process)."""
        return self.out / "candidates" / task.trainer / f"{task.fold}.lock"

    def log(self, task: Task) -> Path:
        """The log of the process that executes a task."""
        return self.out / "logs" / f"{task.trainer}__{task.fold}.log"

    @property
    def diagnose_dir(self) -> Path:
        """protoalign diagnose's report on the training data (with --prototypes)."""
        return self.out / "diagnose"

    @property
    def best_model(self) -> Path:
        """The chosen model."""
        return self.out / "best.model"

    def relative(self, path: Path) -> str:
        """A path inside the output folder, relative to it (how records name files)."""
        return str(Path(path).relative_to(self.out))


def no_gain_verdict(diagnose_dir: Path) -> str | None:
    """The verdict line of a diagnose report that expects no gain from alignment, or None (no such line, or no
    report)."""
    report = Path(diagnose_dir) / "report.json"
    if not report.is_file():
        return None
    verdict = json.loads(report.read_text())["results"]["verdict"]
    return next((line for line in verdict if NO_GAIN in line), None)


def training_groups(trainings: dict[str, tuple], refits: dict[str, bool]) -> list[tuple[str, ...]]:
    """Candidate names (keys of ``trainings``, in order) grouped by identical training (``training_key``), in order
    of first appearance; in each group the candidates that do not refit their offset (``refits``) come first."""
    groups: dict[tuple, list[str]] = {}
    for name, training in trainings.items():
        groups.setdefault(training, []).append(name)
    return [tuple(sorted(names, key=lambda name: refits[name])) for names in groups.values()]


def training_key(argv: Sequence[str]) -> tuple:
    """What a training command trains, whatever its spelling: the program with its own options, and the
    mace_run_train arguments as mace's parser reads them (a repeated option counts once, with its last value), so
    that candidates whose recipes coincide (e.g. 100 and 200 epochs both capped by --max-epochs) share a training."""
    from protoalign_cli.mace.arguments import parse_mace_args

    start = argv.index("--") + 1 if "--" in argv else 1
    parsed = vars(parse_mace_args(argv[start:]))
    return tuple(argv[:start]), tuple(sorted((key, repr(value)) for key, value in parsed.items()))


def plan_tasks(groups: Sequence[tuple[str, ...]], folds: Sequence[str]) -> list[Task]:
    """The validation tasks: every group on every fold, numbered group by group, fold by fold."""
    return [Task(index, fold, group) for index, (group, fold) in
            enumerate((group, fold) for group in groups for fold in folds)]


@dataclasses.dataclass
class TunePlan:
    """A tune's settings, candidates (``active`` run, ``skipped`` lines say why not), folds and validation tasks."""

    settings: TuneSettings
    layout: TuneLayout
    candidates: CandidateSet
    active: list[Method]
    skipped: list[str]
    folds: list[str]
    tasks: list[Task]

    def method(self, name: str) -> Method:
        """The candidate called ``name``."""
        return self.candidates.method(name)

    def command(self, name: str, fold: str, epochs: int | None = None) -> list[str]:
        """The argv that trains candidate ``name`` on ``fold`` (run in its task folder): the shared arguments,
        the recipe, the candidate's own; bounded by --max-epochs; exactly ``epochs`` epochs when given."""
        method, settings = self.method(name), self.settings
        arguments = [*shared_arguments(SEED, self.layout.train_file(fold), self.layout.valid_file(fold),
                                       settings.energy_key, settings.forces_key, settings.device,
                                       self.candidates.mace_args),
                     *method.mace_arguments(settings, self.products(method))]
        if settings.max_epochs is not None:
            arguments = cap_epochs(arguments, settings.max_epochs, mace_default(MAX_EPOCHS[0]),
                                   mace_default(PATIENCE[0]))
        if epochs is not None:
            arguments = for_epochs(arguments, epochs)
        return method.command(arguments, self.products(method))

    def products(self, method: Method) -> dict[str, Path]:
        """The prototype file of an alignment candidate (by its key), nothing for the others."""
        return {method.prototypes_key: self.settings.prototypes} if is_alignment(method) else {}

    def fingerprint(self, name: str, fold: str, epochs: int | None = None) -> str:
        """A hash of the command and file contents that define candidate ``name``'s result on ``fold``
        (``bench.layout.fingerprint``; the offset refit enters as a setting)."""
        method = self.method(name)
        files = {"train": self.layout.train_file(fold), "valid": self.layout.valid_file(fold),
                 "foundation_model": self.settings.foundation_model, **self.products(method)}
        extra = {"refit_offset": True} if method.refit_offset else None
        return fingerprint(self.command(name, fold, epochs), files, extra)

    def retrain_task(self, winner: str) -> Task:
        """The final retrain of the winner on every configuration (with --folds)."""
        return Task(len(self.tasks), RETRAIN_FOLD, (winner,))

    def done_path(self, candidate: str, fold: str) -> Path:
        """The done.json of a candidate on a fold."""
        return self.layout.task_dir(candidate, fold) / DONE


def check_commands(settings: TuneSettings, candidates: CandidateSet, layout: TuneLayout) -> None:
    """Refuse a candidate whose mace_run_train arguments (the recipe's and its own) mace's parser rejects, before
    anything trains (its files need not exist yet)."""
    from protoalign_cli.mace.arguments import parse_mace_args

    draft = TunePlan(settings, layout, candidates, list(candidates.methods), [], fold_names(settings.folds), [])
    for method in candidates.methods:
        argv = draft.command(method.name, draft.folds[0])
        try:
            parse_mace_args(argv[argv.index("--") + 1:] if "--" in argv else argv[1:])
        except ProtoalignError as exc:
            raise ProtoalignError(f"candidate {method.name}: {exc}") from None


def build_plan(settings: TuneSettings, candidates: CandidateSet, layout: TuneLayout) -> TunePlan:
    """The plan of a tune whose split files exist (and diagnose report, with --prototypes and alignment
    candidates): the candidates that run, grouped by training, on every fold."""
    active, skipped = active_candidates(candidates, settings.prototypes is not None,
                                        no_gain_verdict(layout.diagnose_dir), settings.keep_alignment)
    folds = fold_names(settings.folds)
    plan = TunePlan(settings, layout, candidates, active, skipped, folds, [])
    trainings = {method.name: training_key(plan.command(method.name, folds[0])) for method in active}
    plan.tasks = plan_tasks(training_groups(trainings, {m.name: m.refit_offset for m in active}), folds)
    return plan


def load_plan(out: Path) -> TunePlan:
    """The plan of an output folder prepared by ``protoalign tune`` (from its tune.json)."""
    record = read_record(out)
    if record is None:
        raise ProtoalignError(f"{out} holds no tune.json; run protoalign tune with its options (or --slurm) first")
    settings = settings_from_record(record, out)
    return build_plan(settings, parse_candidates(record["candidates"], record["candidates_file"]), TuneLayout(out))
