"""``protoalign bench``: does alignment beat plain fine-tuning on your data, with error bars?"""

from __future__ import annotations

from pathlib import Path

import click

from protoalign_cli.bench import DEFAULT_JOBS, DEFAULT_OUT_ROOT


@click.command("bench")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Output folder (default: {DEFAULT_OUT_ROOT}/<config name>). Rerunning resumes: finished runs are kept.")
@click.option("--jobs", type=int, default=DEFAULT_JOBS, show_default=True, help="Runs at once (subprocesses).")
@click.option("--slurm", is_flag=True, help="Prepare splits and source, then write OUT/bench.sbatch (an array job, one task per run) instead of running.")
@click.option("--sbatch-option", "sbatch_options", multiple=True, metavar="TEXT",
              help="With --slurm: an extra #SBATCH line (repeatable), e.g. --sbatch-option=--gres=gpu:1.")
@click.option("--only", multiple=True, metavar="METHOD",
              help="Run only this method's runs this time (repeatable); the summaries cover every finished run.")
@click.option("--budget", "budgets", type=int, multiple=True, metavar="N",
              help="Run only the runs with this training-set size this time (repeatable).")
@click.option("--seed", "seeds", type=int, multiple=True, metavar="S",
              help="Run only this seed's runs this time (repeatable); e.g. one seed of every method per session.")
@click.option("--summarize", is_flag=True,
              help="Train nothing: write the summaries from the finished runs (this folder's, and the identical "
                   "committed ones that reuse_runs_from names, e.g. on a fresh machine).")
@click.option("--run-index", type=int, default=None, help="Run only this run of the grid (what each array task calls).")
@click.option("--expect-run", default=None, hidden=True, help="METHOD/N<N>_seed<S> that --run-index must be.")
def bench_command(config, out, jobs, slurm, sbatch_options, only, budgets, seeds, summarize, run_index,
                  expect_run):
    """Run a grid of fine-tuning runs (methods x budgets x seeds) from CONFIG.yaml and summarise it.

    \b
    protoalign bench benchmarks/configs/aspirin_xtb.yaml --jobs 2     # rerun it to resume
    protoalign bench benchmarks/configs/aspirin_xtb.yaml --seed 1 --jobs 2   # one chunk of the grid
    # on a cluster: write OUT/bench.sbatch, submit it, then summarise
    protoalign bench my_bench.yaml --slurm --sbatch-option=--gres=gpu:1
    sbatch bench_runs/<name in my_bench.yaml>/bench.sbatch
    protoalign bench my_bench.yaml
    protoalign bench benchmarks/configs/aspirin_anicc_recipe.yaml --summarize   # from committed results

    Writes OUT/runs.csv, OUT/summary.md (mean ± sd over seeds, paired % difference to plain
    fine-tuning) and OUT/learning_curve.png. See benchmarks/configs/ for examples.
    """
    from protoalign_cli.bench.config import load_config
    from protoalign_cli.bench.layout import default_out
    from protoalign_cli.bench.schedule import execute_run, run_grid, write_slurm_script
    from protoalign_cli.io.outputs import check_output_folder

    settings = load_config(config)
    out = out or default_out(settings)
    check_output_folder(out)
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    if run_index is not None:
        result = execute_run(settings, out, run_index, expect_run)
        click.echo(f"{result['method']} N={result['n_train']} seed={result['seed']}: test energy MAE "
                   f"{result['energy_mae_mev']:.2f} meV, force MAE {result['force_mae_mev_per_a']:.2f} meV/Å")
        return
    if slurm:
        script = write_slurm_script(settings, out, say, sbatch_options)
        click.echo(f"wrote {script}; submit it with `sbatch {script}`, then rerun this command without --slurm to summarise")
        return
    result = run_grid(settings, out, jobs, say, only, train=not summarize, budgets=budgets, seeds=seeds)
    click.echo(f"{result['done']} runs done ({result['ran']} this time); summary in {result['outputs']['summary']}")


COMMANDS = [bench_command]
