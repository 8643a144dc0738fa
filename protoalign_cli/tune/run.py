"""Running a tune: prepare the output folder (checks, tune.json, split files, the diagnosis), run the unfinished
tasks (``--jobs`` subprocesses ``protoalign tune --out OUT --task I``, or a SLURM array script), choose, retrain
the winner on every configuration (with --folds), write best.model and the report."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from protoalign_cli.bench.command import cli_command
from protoalign_cli.bench.layout import lock_holder, read_done
from protoalign_cli.bench.schedule import pool_environment, run_pool, write_array_script
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.tune.candidates import check_batch_sizes, is_alignment, load_candidates
from protoalign_cli.tune.choose import RETRAIN_FOLD, CandidateResult
from protoalign_cli.tune.data import (HOLDOUT, check_model_elements, check_prototypes_model, fold_names, key_values,
                                      order_by_key, read_labelled, validation_splits, write_split)
from protoalign_cli.tune.plan import TRAIN_FILE, Task, TuneLayout, TunePlan, build_plan, check_commands
from protoalign_cli.tune.settings import (TuneSettings, check_options, check_same_settings, read_record,
                                          settings_record, write_record)
from protoalign_cli.tune.task import finished_records, ranking, retrain_of, validation_records

SBATCH = "tune.sbatch"


def prepare(settings: TuneSettings, say=print) -> TunePlan:
    """Check the options and inputs (before anything is written), then write tune.json, the split files and, with
    --prototypes and alignment candidates, the diagnosis of the training data; return the plan."""
    from protoalign_cli.io.outputs import check_output_folder

    check_options(settings)
    given = settings.with_default_validation()
    settings = given.resolved()
    check_output_folder(settings.out)
    candidates = load_candidates(settings.candidates)
    layout = TuneLayout(settings.out)
    record = settings_record(settings, candidates)
    earlier = read_record(layout.out)
    check_same_settings(record, earlier, layout.out)
    # the inputs were checked when every split file was written (their contents are in tune.json's sha256)
    splits = checked_splits(given, layout) if earlier is None or not splits_written(layout, settings) else {}
    if splits:  # errors name the files as given
        check_batch_sizes(candidates, min(len(indices) for path, (_, indices) in splits.items()
                                          if path.name == TRAIN_FILE and path != layout.train_file(RETRAIN_FOLD)))
        check_commands(settings, candidates, layout)
    (layout.out / "logs").mkdir(parents=True, exist_ok=True)
    write_record(layout.out, record)  # again on a rerun: the criterion's weights may have changed
    for path, (frames, indices) in splits.items():
        write_split(frames, indices, path)
    if settings.prototypes is not None and any(is_alignment(m) for m in candidates.methods):
        diagnose_training_data(settings, layout, say)
    plan = build_plan(settings, candidates, layout)
    for line in plan.skipped:
        say(f"skipped {line}")
    return plan


def split_files(layout: TuneLayout, settings: TuneSettings) -> list[Path]:
    """The split files a tune needs: each fold's training and validation files, and with --folds the final
    retrain's training file."""
    folds = fold_names(settings.folds)
    paths = [path for fold in folds for path in (layout.train_file(fold), layout.valid_file(fold))]
    return paths + ([layout.train_file(RETRAIN_FOLD)] if settings.folds is not None else [])


def splits_written(layout: TuneLayout, settings: TuneSettings) -> bool:
    """Whether every split file exists (then the inputs were checked when they were written)."""
    return all(path.is_file() for path in split_files(layout, settings))


def checked_splits(settings: TuneSettings, layout: TuneLayout) -> dict[Path, tuple[list, list[int]]]:
    """Read and check the inputs (labels, finite values, the split's sizes, prototypes' model, elements) and
    return each split file's configurations and the indices it takes from them."""
    train = read_labelled(settings.train, settings.energy_key, settings.forces_key, "train")
    frame_sets = {settings.train: train}
    if settings.validation_mode == "file":
        valid = read_labelled(settings.valid, settings.energy_key, settings.forces_key, "valid")
        frame_sets[settings.valid] = valid
        splits = {layout.train_file(HOLDOUT): (train, list(range(len(train)))),
                  layout.valid_file(HOLDOUT): (valid, list(range(len(valid))))}
    else:
        order = (list(range(len(train))) if settings.order_key is None else
                 order_by_key(key_values(train, settings.order_key, settings.train)))
        parts = validation_splits(len(train), settings.validation_mode, settings.valid_fraction, settings.folds, order)
        splits = {path: (train, indices) for fold, (train_part, valid_part) in parts.items()
                  for path, indices in ((layout.train_file(fold), train_part), (layout.valid_file(fold), valid_part))}
        if settings.folds is not None:
            splits[layout.train_file(RETRAIN_FOLD)] = (train, list(range(len(train))))
    if settings.prototypes is not None:
        check_prototypes_model(settings.prototypes, settings.foundation_model)
    check_model_elements(frame_sets, settings.foundation_model)
    return splits


def diagnose_training_data(settings: TuneSettings, layout: TuneLayout, say) -> None:
    """protoalign diagnose of the prototypes on the training data, once (its report in OUT/diagnose/)."""
    from protoalign_cli.diagnose import DiagnoseRequest, run_diagnose

    if layout.diagnose_dir.exists():
        return
    say("diagnosing the prototypes on the training data (protoalign diagnose, once)")
    # on the CPU: a few hundred configurations at most, and a SLURM tune prepares on a login node
    results = run_diagnose(DiagnoseRequest(prototypes=settings.prototypes, configs=[settings.train],
                                           out=layout.diagnose_dir, foundation_model=str(settings.foundation_model),
                                           energy_key=settings.energy_key, device="cpu"))
    for line in results.verdict:
        say(f"diagnose: {line}")


def tasks_to_do(plan: TunePlan, tasks: Sequence[Task], epochs: int | None, say) -> tuple[list[Task], int]:
    """The tasks still to run, and how many are finished (their records checked against their fingerprints);
    those another live process holds are neither (skipped)."""
    todo, n_done = [], 0
    for task in tasks:
        if all(finished_records(plan, task, epochs).values()):
            n_done += 1
            continue
        holder = lock_holder(plan.layout.lock(task))
        if holder is not None:
            say(f"{task.label}: being run by {holder}, skipped")
        else:
            todo.append(task)
    return todo, n_done


def run_tasks(plan: TunePlan, todo: Sequence[Task], jobs: int, total: int, say) -> None:
    """Run tasks as ``protoalign tune --out OUT --task I`` subprocesses, ``jobs`` at a time; ProtoalignError
    naming those that failed."""
    layout = plan.layout

    def command(task: Task) -> tuple[list[str], Path]:
        say(f"[{task.index + 1}/{total}] {task.label}: running")
        return cli_command("tune", "--out", str(layout.out), "--task", str(task.index)), layout.log(task)

    def finished(task: Task, status: int, elapsed: float) -> bool:
        records = [read_done(plan.done_path(name, task.fold)) for name in task.candidates]
        if status != 0 or None in records:
            say(f"[{task.index + 1}/{total}] {task.label}: FAILED after {elapsed:.0f} s (see {layout.log(task)})")
            return False
        say(f"[{task.index + 1}/{total}] {task.label}: done in {elapsed:.0f} s" + "".join(
            f"; {r['candidate']}: validation energy MAE {r['valid_energy_mae_mev']:.1f} meV, force MAE "
            f"{r['valid_force_mae_mev_per_a']:.1f} meV/Å" for r in records if r["valid_energy_mae_mev"] is not None))
        return True

    try:
        failed = run_pool(todo, jobs, pool_environment(jobs), command, finished)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("finished trainings are kept; rerun the same command to resume") from None
    if failed:
        raise ProtoalignError(f"{len(failed)} task(s) failed ({', '.join(t.label for t in failed)}); see "
                              f"{layout.out / 'logs'}; rerun the same command to retry only those")


def run_tune(settings: TuneSettings, jobs: int = 1, say=print) -> dict:
    """Prepare, run every unfinished task, choose, retrain the winner on all configurations (--folds), write
    best.model and the report. Returns {"ranked", "winner", "best_model", "report"}."""
    if jobs < 1:
        raise ProtoalignError("--jobs must be >= 1")
    plan = prepare(settings, say)
    todo, n_done = tasks_to_do(plan, plan.tasks, None, say)
    total = len(plan.tasks) + (plan.settings.folds is not None)
    say(f"{len(plan.tasks)} tasks ({len(plan.active)} candidates on {len(plan.folds)} fold(s)): "
        f"{n_done} already done, {len(todo)} to run, {jobs} at a time")
    run_tasks(plan, todo, jobs, total, say)
    ranked = ranking(plan)
    if plan.settings.folds is not None:
        task, epochs = retrain_of(plan, ranked[0].name)
        todo, _ = tasks_to_do(plan, [task], epochs, say)
        say(f"final retrain of {ranked[0].name} on every configuration"
            f"{f' for {epochs} epochs' if epochs else ''}: {'to run' if todo else 'already done'}")
        run_tasks(plan, todo, jobs, total, say)
    return finish(plan, ranked)


def write_slurm_script(settings: TuneSettings, say=print, sbatch_options: Sequence[str] = ()) -> Path | None:
    """Prepare, then write OUT/tune.sbatch: an array job of the unfinished validation tasks, or once they are all
    finished (with --folds) of the final retrain. None when nothing is left to train."""
    plan = prepare(settings, say)
    layout, note = plan.layout, ("one task per unfinished training; afterwards rerun the same command without "
                                 "--slurm to choose and report")
    todo, _ = tasks_to_do(plan, plan.tasks, None, say)
    if not todo and plan.settings.folds is not None:
        task, epochs = retrain_of(plan, ranking(plan)[0].name)
        todo, _ = tasks_to_do(plan, [task], epochs, say)
        note = "the winner's final retrain on every configuration; afterwards rerun the same command without --slurm"
    elif todo and plan.settings.folds is not None:
        note += " (with --folds, the winner's final retrain comes next: rerun with --slurm for its script)"
    if not todo:
        return None
    return write_array_script(layout.out / SBATCH, f"tune-{layout.out.name}", [t.index for t in todo],
                              layout.out / "logs", sbatch_options, note,
                              cli_command("tune", "--out", str(layout.out), "--task"))


def finish(plan: TunePlan, ranked: Sequence[CandidateResult]) -> dict:
    """Copy the winner's model to OUT/best.model and write the report (``report.write_report``)."""
    from protoalign_cli.io.outputs import atomic_output
    from protoalign_cli.tune.report import write_report
    from protoalign_cli.tune.summary import report_info

    winner, layout = ranked[0].name, plan.layout
    records = validation_records(plan)
    final = read_done(plan.done_path(winner, RETRAIN_FOLD if plan.settings.folds is not None else HOLDOUT))
    if plan.settings.folds is not None:
        records.append(final)
    with atomic_output(layout.best_model, overwrite=True) as tmp:
        shutil.copyfile(layout.out / final["model"], tmp)
    paths = write_report(layout.out, ranked, records, report_info(plan, winner, final))
    return {"ranked": ranked, "winner": ranked[0], "best_model": layout.best_model, "report": paths["report_md"]}
