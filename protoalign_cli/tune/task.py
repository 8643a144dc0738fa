"""One task of a tune: train once, evaluate each candidate of the task on the fold's validation configurations
(float64, the model mace kept; a refit copy for ``refit_offset`` candidates), write their done.json records.

A record (one per candidate and fold, in candidates/<name>/<fold>/done.json) holds the validation errors in
meV per configuration, meV/atom and meV/Å, the epoch of the model mace kept and the epochs it ran (from its
log), the wall time, the command and its fingerprint, and the model and per-epoch log it names (relative to
the output folder). A task whose records exist with matching fingerprints is never run again.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from protoalign_cli.bench.command import run_logged
from protoalign_cli.bench.layout import (MODEL_NAME, check_fingerprint, claimed, read_done, refit_model, trained_model,
                                         write_done)
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.tune.candidates import retrain_epochs
from protoalign_cli.tune.choose import RETRAIN_FOLD, rank_candidates
from protoalign_cli.tune.plan import SEED, Task, TunePlan

if TYPE_CHECKING:
    from protoalign_cli.tune.choose import CandidateResult

KEPT_EPOCH = re.compile(r"Loaded Stage (?:one|two) model from epoch (\d+)")
RUN_TAG = f"{MODEL_NAME}_run-{SEED}"  # mace's name of a run's log and results files


def kept_epoch(log_text: str) -> int | None:
    """The epoch (0-based) of the model mace kept, from its log ("Loaded Stage one/two model from epoch N"; the
    last such line: stage two's after a stage two); None when the log does not say."""
    found = KEPT_EPOCH.findall(log_text)
    return int(found[-1]) if found else None


def epochs_run(results_lines: list[str]) -> int | None:
    """How many epochs mace trained, from its per-epoch results log (JSON lines; evaluation lines carry
    "mode": "eval" and the epoch, null before training); None when it holds no epoch."""
    epochs = [entry["epoch"] for entry in map(json.loads, filter(str.strip, results_lines))
              if entry.get("mode") == "eval" and entry.get("epoch") is not None]
    return max(epochs) + 1 if epochs else None


def validation_errors(plan: TunePlan, model_path: Path, fold: str) -> dict:
    """The errors of a model on a fold's validation configurations (float64; meV, meV/atom, meV/Å)."""
    import ase.io

    from protoalign_cli.bench.evaluate import calculator, errors_on

    settings = plan.settings
    frames = ase.io.read(plan.layout.valid_file(fold), ":")
    errors = errors_on(calculator(model_path, settings.device), frames, settings.energy_key, settings.forces_key)
    return {"n_valid": len(frames), "valid_energy_mae_mev": errors["energy_mae_mev"],
            "valid_energy_mae_per_atom_mev": errors["energy_mae_mev_per_atom"],
            "valid_force_mae_mev_per_a": errors["force_mae_mev_per_a"],
            "valid_energy_mean_error_mev": errors["energy_mean_error_mev"],
            "valid_energy_rmse_mev": errors["energy_rmse_mev"],
            "valid_force_rmse_mev_per_a": errors["force_rmse_mev_per_a"]}


NO_VALIDATION = dict.fromkeys(("n_valid", "valid_energy_mae_mev", "valid_energy_mae_per_atom_mev",
                               "valid_force_mae_mev_per_a", "valid_energy_mean_error_mev", "valid_energy_rmse_mev",
                               "valid_force_rmse_mev_per_a"))


def validation_records(plan: TunePlan) -> list[dict]:
    """The records of every finished validation task (not the final retrain's)."""
    paths = [plan.done_path(name, task.fold) for task in plan.tasks for name in task.candidates]
    return [done for done in map(read_done, paths) if done is not None]


def ranking(plan: TunePlan) -> list[CandidateResult]:
    """The candidates ranked by the criterion on their validation records (``choose.rank_candidates``);
    ProtoalignError while a validation task is unfinished."""
    unfinished = [task.label for task in plan.tasks
                  if any(read_done(plan.done_path(name, task.fold)) is None for name in task.candidates)]
    if unfinished:
        raise ProtoalignError(f"{len(unfinished)} validation task(s) unfinished ({', '.join(unfinished[:3])}"
                              f"{', ...' if len(unfinished) > 3 else ''}); rerun protoalign tune to finish them")
    return rank_candidates(validation_records(plan), plan.settings.energy_weight, plan.settings.forces_weight)


def retrain_of(plan: TunePlan, winner: str) -> tuple[Task, int | None]:
    """The winner's final retrain task and its epochs (mean best epoch over folds + 1; None when unknown: then
    the recipe's own length)."""
    best = [read_done(plan.done_path(winner, fold))["best_epoch"] for fold in plan.folds]
    return plan.retrain_task(winner), retrain_epochs(best)


def task_at(plan: TunePlan, index: int) -> tuple[Task, int | None]:
    """Task ``index`` and the epochs it trains exactly (None: as its recipe says); the index after the validation
    tasks is the final retrain (with --folds, once every validation task has finished)."""
    if 0 <= index < len(plan.tasks):
        return plan.tasks[index], None
    if index == len(plan.tasks) and plan.settings.folds is not None:
        return retrain_of(plan, ranking(plan)[0].name)
    last = len(plan.tasks) - (plan.settings.folds is None)
    raise ProtoalignError(f"--task {index} is outside 0..{last}")


def finished_records(plan: TunePlan, task: Task, epochs: int | None) -> dict[str, dict | None]:
    """Each candidate's record of a task (None where unfinished); ProtoalignError for a record made with other
    settings."""
    records = {}
    for name in task.candidates:
        done = read_done(plan.done_path(name, task.fold))
        if done is not None:
            check_fingerprint(done, plan.fingerprint(name, task.fold, epochs), plan.layout.task_dir(name, task.fold))
        records[name] = done
    return records


def execute_task(plan: TunePlan, index: int) -> list[dict]:
    """Run task ``index`` unless finished (a lock keeps a second process off it); return its records."""
    task, epochs = task_at(plan, index)
    records = finished_records(plan, task, epochs)
    if all(records.values()):
        return list(records.values())
    layout = plan.layout
    missing = [p for p in (layout.train_file(task.fold), layout.valid_file(task.fold)) if not p.is_file()]
    if missing:
        raise ProtoalignError(f"{missing[0]} is missing; run protoalign tune with its options first to prepare")
    with claimed(layout.lock(task), task.label):
        training_dir = layout.task_dir(task.trainer, task.fold)
        if records[task.trainer] is not None:  # trained already; a twin's evaluation was left
            wall = records[task.trainer]["wall_time_s"]
        else:
            if training_dir.exists():
                shutil.rmtree(training_dir)  # what an unfinished attempt left
            training_dir.mkdir(parents=True)
            wall = round(run_logged(plan.command(task.trainer, task.fold, epochs), training_dir / "train.log",
                                    cwd=training_dir), 1)
        for name in task.candidates:
            if records[name] is None:
                records[name] = finish_candidate(plan, task, name, epochs, wall)
    return list(records.values())


def finish_candidate(plan: TunePlan, task: Task, name: str, epochs: int | None, wall: float) -> dict:
    """Evaluate candidate ``name`` on the task's training (after its offset refit, if it refits); write and
    return its record."""
    import ase.io

    from protoalign_cli.bench.evaluate import refit_offset
    from protoalign_cli.bench.report import shown_command
    from protoalign_cli.bench.schedule import device_name

    layout, method, fold = plan.layout, plan.method(name), task.fold
    training_dir, folder = layout.task_dir(task.trainer, fold), layout.task_dir(name, fold)
    folder.mkdir(parents=True, exist_ok=True)
    model = trained_model(training_dir)
    if not model.is_file():
        raise ProtoalignError(f"{task.label}: training finished but wrote no {model}")
    start, extra = time.perf_counter(), {}
    if folder != training_dir:
        extra["trained_by"] = layout.relative(training_dir)
    if method.refit_offset:
        extra["offset_refit"] = refit_offset(plan.settings, layout.train_file(fold), model, refit_model(folder))
        model = refit_model(folder)
    valid = NO_VALIDATION if fold == RETRAIN_FOLD else validation_errors(plan, model, fold)
    log, results = training_dir / "logs" / f"{RUN_TAG}.log", training_dir / "results" / f"{RUN_TAG}_train.txt"
    record = {
        "candidate": name, "fold": fold, "kind": method.kind, "setting": method.setting,
        "n_train": len(ase.io.read(layout.train_file(fold), ":")), **valid,
        "best_epoch": kept_epoch(log.read_text()) if log.is_file() else None,
        "epochs_run": epochs_run(results.read_text().splitlines()) if results.is_file() else None,
        "retrain_epochs": epochs, "wall_time_s": wall, "eval_time_s": round(time.perf_counter() - start, 1),
        "device": device_name(plan.settings.device), "command": shown_command(plan.command(name, fold, epochs)),
        "fingerprint": plan.fingerprint(name, fold, epochs), "model": layout.relative(model),
        "curve": layout.relative(results) if results.is_file() else None, **extra,
    }
    write_done(plan.done_path(name, fold), record, overwrite=False)
    return record
