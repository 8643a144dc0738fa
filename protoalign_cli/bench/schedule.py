"""Running a bench: the grid locally (``--jobs`` subprocesses, one per run), one run of it (what each
subprocess or SLURM array task executes), and the SLURM array script. The subprocess pool (``run_pool``) and
the array script (``write_array_script``) serve ``protoalign tune`` too."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

from protoalign_cli.bench import DEFAULT_JOBS
from protoalign_cli.bench.command import cli_command, run_logged
from protoalign_cli.bench.data import prepare_splits
from protoalign_cli.bench.evaluate import complete_metrics, evaluate_model, refit_offset, shifted_metrics
from protoalign_cli.bench.layout import (DONE, BenchLayout, Run, check_fingerprint, claimed, lock_holder,
                                         plan_runs, read_done, refit_model, reuse_finished, run_fingerprint,
                                         trained_model, trained_twin, training_command, write_done)
from protoalign_cli.bench.report import shown_command, summarize
from protoalign_cli.bench.source import method_products, prepare_source
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io.outputs import atomic_output
from protoalign_cli.io.provenance import run_summary, write_summary

if TYPE_CHECKING:
    from protoalign_cli.bench.config import BenchConfig

T = TypeVar("T")


def prepare(config: BenchConfig, out: Path, say=print) -> tuple[BenchLayout, list[Run], dict[str, Path]]:
    """Create the output folder, split files and source products; return the layout, runs and products."""
    layout = BenchLayout(out)
    runs = plan_runs(config)
    (layout.out / "logs").mkdir(parents=True, exist_ok=True)
    prepare_splits(config, layout, runs)
    products = prepare_source(config, layout, say)
    return layout, runs, products


def run_grid(config: BenchConfig, out: Path, jobs: int = DEFAULT_JOBS, say=print, only: Sequence[str] = (),
             train: bool = True, budgets: Sequence[int] = (), seeds: Sequence[int] = ()) -> dict:
    """Run every unfinished run, ``jobs`` at a time (subprocesses), then write the summaries.

    Each run is a ``protoalign bench CONFIG --out OUT --run-index I`` subprocess (as in a SLURM
    array), its output in logs/. ``only``, ``budgets``, ``seeds``: run just these methods', budgets' and seeds'
    runs this time (a chunk of a grid; the summaries still cover every finished run). ``train`` False: train nothing, only summarise the finished runs
    (this folder's and the identical ones of ``reuse_runs_from``). Returns {"done", "ran", "failed", "outputs"}.
    """
    if jobs < 1:
        raise ProtoalignError("--jobs must be >= 1")
    chosen = chunk_of_grid(plan_runs(config), only, budgets, seeds, config.path.name)
    layout, runs, products = prepare(config, out, say)
    todo, n_done = _runs_to_do(config, layout, [r for r in runs if r in chosen], len(runs), products, say)
    if not train:
        say(f"{len(runs)} runs: {n_done} done, {len(todo)} not finished (not trained: summaries only)")
        todo = []
    else:
        chunk = f" ({len(chosen)} chosen by --only/--budget/--seed)" if len(chosen) < len(runs) else ""
        say(f"{len(runs)} runs{chunk}: {n_done} already done, {len(todo)} to run, {jobs} at a time")
    waiting = refits_of_pending_trainings(config, layout, todo, products)
    failed = [run for batch in ([r for r in todo if r not in waiting], waiting)
              for run in _schedule(config, layout, batch, jobs, pool_environment(jobs), len(runs), say)]
    outputs = summarize(config, layout)
    result = {"done": n_done + len(todo) - len(failed), "ran": len(todo) - len(failed), "failed": [r.label for r in failed],
              "outputs": outputs}
    if failed:
        raise ProtoalignError(f"{len(failed)} run(s) failed ({', '.join(r.label for r in failed)}); "
                              f"see {layout.out / 'logs'}; rerun the same command to retry only those")
    return result


def chunk_of_grid(runs: list[Run], methods: Sequence[str], budgets: Sequence[int], seeds: Sequence[int],
                  config_name: str) -> list[Run]:
    """The runs of ``runs`` whose method, budget and seed are among those asked for (an empty choice keeps all).
    A name or number that no run of the grid has is an error, not an empty chunk."""
    for option, asked, present in (("--only", methods, [r.method for r in runs]),
                                   ("--budget", budgets, [r.n_train for r in runs]),
                                   ("--seed", seeds, [r.seed for r in runs])):
        missing = [value for value in asked if value not in present]
        if missing:
            known = ", ".join(str(v) for v in dict.fromkeys(present))
            raise ProtoalignError(f"{option} {missing[0]}: no trained run of {config_name} has it ({known})")
    return [r for r in runs if (not methods or r.method in methods) and (not budgets or r.n_train in budgets)
            and (not seeds or r.seed in seeds)]


def refits_of_pending_trainings(config: BenchConfig, layout: BenchLayout, todo: list[Run],
                                products: dict[str, Path]) -> list[Run]:
    """The runs of ``todo`` that only add the offset refit to a training another run of ``todo`` does: they run
    after it (then they refit its model in seconds) instead of beside it (training the same model again)."""
    trainings = {run_fingerprint(config, layout, run, products) for run in todo}
    return [run for run in todo if config.method(run.method).refit_offset
            and run_fingerprint(config, layout, run, products, with_refit=False) in trainings]


def _runs_to_do(config: BenchConfig, layout: BenchLayout, runs: list[Run], total: int, products: dict[str, Path],
                say) -> tuple[list[Run], int]:
    """The runs still to train, and how many are done (reused from another bench or finished here; their
    fingerprints checked and newer metrics added). Runs another live process holds are skipped."""
    todo, n_done = [], 0
    for run in runs:
        fingerprint = run_fingerprint(config, layout, run, products)
        done = read_done(layout.run_dir(run) / DONE)
        if done is None:
            done = reuse_finished(config, layout, run, fingerprint)
            if done is not None:
                say(f"[{run.index + 1}/{total}] {run.label}: reused from {done.get('reused_from', 'another bench')}")
        holder = lock_holder(layout.lock(run))
        if done is not None:
            check_fingerprint(done, fingerprint, layout.run_dir(run))
            complete_metrics(config, layout, run, say)
            n_done += 1
        elif holder is not None:
            say(f"[{run.index + 1}/{total}] {run.label}: being run by {holder}, skipped")
        else:
            todo.append(run)
    return todo, n_done


def _schedule(config: BenchConfig, layout: BenchLayout, todo: list[Run], jobs: int, env: dict, total: int, say) -> list[Run]:
    """Run ``todo`` as subprocesses, at most ``jobs`` at once; one progress line per state change."""

    def command(run: Run) -> tuple[list[str], Path]:
        say(f"[{run.index + 1}/{total}] {run.label}: running")
        return cli_command("bench", str(config.path), "--out", str(layout.out), "--run-index", str(run.index),
                           "--expect-run", f"{run.method}/{run.key}"), layout.log(run)

    def finished(run: Run, status: int, elapsed: float) -> bool:
        done = read_done(layout.run_dir(run) / DONE)
        if status == 0 and done is not None:
            say(f"[{run.index + 1}/{total}] {run.label}: done in {elapsed:.0f} s, test energy MAE "
                f"{done['energy_mae_mev']:.1f} meV, force MAE {done['force_mae_mev_per_a']:.1f} meV/Å")
            return True
        say(f"[{run.index + 1}/{total}] {run.label}: FAILED after {elapsed:.0f} s (see {layout.log(run)})")
        return False

    return run_pool(todo, jobs, env, command, finished)


def pool_environment(jobs: int) -> dict:
    """The environment of ``jobs`` subprocesses at once: this one's, with the CPU cores shared out among them
    (OMP_NUM_THREADS, unless set)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def run_pool(tasks: Sequence[T], jobs: int, env: dict, command: Callable[[T], tuple[list[str], Path]],
             finished: Callable[[T, int, float], bool]) -> list[T]:
    """Run one subprocess per task, at most ``jobs`` at once, in order; return the tasks that failed.

    ``command(task)``: the argv and log file of a task (called as it starts); ``finished(task, exit status,
    wall time in s)``: whether it succeeded (called as it ends). Each subprocess runs in its own session; on
    an exception or SIGTERM the running ones get SIGTERM (they and the programs they started).
    """
    pending, active, failed = list(tasks), {}, []
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        while pending or active:
            while pending and len(active) < jobs:
                task = pending.pop(0)
                argv, log_path = command(task)
                log = open(log_path, "w")
                process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                active[task] = (process, log, time.perf_counter())
            time.sleep(0.2)
            for task, (process, log, start) in list(active.items()):
                if process.poll() is None:
                    continue
                log.close()
                del active[task]
                if not finished(task, process.returncode, time.perf_counter() - start):
                    failed.append(task)
    except BaseException:
        for process, log, _ in active.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # the task and the programs it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            log.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failed


def _terminate(signum, frame):
    raise SystemExit(f"terminated by signal {signum}")


def execute_run(config: BenchConfig, out: Path, index: int, expected: str | None = None) -> dict:
    """Train and evaluate run ``index`` of the grid in bench folder ``out`` (unless done); write its
    done.json; return it.

    ``expected`` ('<method>/N<N>_seed<s>') guards against a config edited since the index was chosen.
    A lock file (``BenchLayout.lock``) keeps two processes from running the same run.
    """
    layout = BenchLayout(out)
    runs = plan_runs(config)
    if not 0 <= index < len(runs):
        raise ProtoalignError(f"--run-index {index} is outside 0..{len(runs) - 1}")
    run = runs[index]
    if expected is not None and expected != f"{run.method}/{run.key}":
        raise ProtoalignError(f"run {index} of {config.path.name} is now {run.label}, not {expected}: was the config edited?")
    products = method_products(config.method(run.method), config, layout)
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
    """Train one run in a fresh folder, evaluate its model on test and validation, write done.json."""
    folder = layout.run_dir(run)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    command = training_command(config, layout, run, products)
    method = config.method(run.method)
    twin = trained_twin(layout, run, run_fingerprint(config, layout, run, products, with_refit=False)) \
        if method.refit_offset else None
    if twin is not None:  # the same training, finished by another entry: its model, not a second training
        shutil.copy2(trained_model(twin), folder / trained_model(twin).name)
        wall, extra = read_done(twin / DONE)["wall_time_s"], {"trained_by": str(twin.relative_to(layout.out))}
    else:
        wall, extra = run_logged(command, folder / "train.log", cwd=folder), {}
    model_path = trained_model(folder)
    if not model_path.is_file():
        raise ProtoalignError(f"{run.label}: training finished but wrote no {model_path}")
    start = time.perf_counter()
    if method.refit_offset:
        extra["offset_refit"] = refit_offset(config, layout.train_file(run.n_train, run.seed), model_path,
                                             refit_model(folder))
        model_path = refit_model(folder)
    test, valid = evaluate_model(config, layout, model_path)
    result = {
        "method": run.method, "kind": method.kind, "setting": method.setting, "n_train": run.n_train, "seed": run.seed,
        **{k: v for k, v in test.items() if k != "energy_errors_mev"}, **shifted_metrics(test, valid),
        "valid_energy_mae_mev": valid["energy_mae_mev"], "valid_force_mae_mev_per_a": valid["force_mae_mev_per_a"],
        "wall_time_s": round(wall, 1), "eval_time_s": round(time.perf_counter() - start, 1),
        "device": device_name(config.device), "evaluated_model": model_path.name,
        "fingerprint": fingerprint, "command": shown_command(command), **extra,
    }
    write_summary(folder / "run_summary.json", run_summary("bench-run", {"config": str(config.path), "run": run.label}, result))
    write_done(folder / DONE, result, overwrite=False)
    return result


def device_name(device: str) -> str:
    """A readable name of the device runs train on."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else device
    return f"cpu ({os.cpu_count()} cores)"


def write_slurm_script(config: BenchConfig, out: Path, say=print, sbatch_options: Sequence[str] = ()) -> Path:
    """Prepare splits and source, then write an array-job script (one task per unfinished run)."""
    layout, runs, _ = prepare(config, out, say)
    todo = [r.index for r in runs if read_done(layout.run_dir(r) / DONE) is None]
    return write_array_script(layout.out / "bench.sbatch", f"bench-{config.name}", todo, layout.out / "logs",
                              sbatch_options, "one task per unfinished run; afterwards rerun the same command "
                              "without --slurm to summarise",
                              cli_command("bench", str(config.path), "--out", str(layout.out), "--run-index"))


def write_array_script(script: Path, job_name: str, indices: Sequence[int], log_dir: Path,
                       sbatch_options: Sequence[str], note: str, command: Sequence[str]) -> Path:
    """Write a SLURM array-job script (atomically, replacing an earlier one): array tasks ``indices`` (0 when
    none), logs in ``log_dir``, extra ``#SBATCH`` lines, a ``# note`` line; each task runs ``command`` with its
    array index appended."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --array={','.join(map(str, indices)) or '0'}",
             f"#SBATCH --output={log_dir}/slurm-%A_%a.log", *(f"#SBATCH {o}" for o in sbatch_options),
             f"# {note}", "set -euo pipefail", shlex.join(command) + " $SLURM_ARRAY_TASK_ID", ""]
    with atomic_output(script, overwrite=True) as tmp:
        tmp.write_text("\n".join(lines))
    return script
