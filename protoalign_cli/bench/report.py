"""The outputs of a bench from its finished runs: runs.csv, summary.md (mean ± sd over seeds, paired %
difference to the baseline) and learning_curve.png."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from protoalign_cli.bench.layout import DONE, BenchLayout, plan_runs, read_done
from protoalign_cli.bench.stats import mean_sd, paired_percent_differences
from protoalign_cli.io.outputs import atomic_output

if TYPE_CHECKING:
    from protoalign_cli.bench.config import BenchConfig

CSV_COLUMNS = ("method", "setting", "n_train", "seed", "energy_mae_mev", "energy_rmse_mev",
               "energy_mae_mev_per_atom", "energy_rmse_mev_per_atom", "force_mae_mev_per_a",
               "force_rmse_mev_per_a", "valid_energy_mae_mev", "valid_force_mae_mev_per_a",
               "wall_time_s", "device", "energy_mean_error_mev", "energy_mae_valid_shifted_mev",
               "valid_energy_mae_shifted_mev")
MEAN_COLUMNS = ("energy_mae_mev", "energy_mae_mev_per_atom", "force_mae_mev_per_a", "valid_energy_mae_mev",
                "valid_force_mae_mev_per_a", "wall_time_s",
                "energy_mae_valid_shifted_mev", "valid_energy_mae_shifted_mev")
DELTA_COLUMNS = ("energy_mae_mev", "force_mae_mev_per_a", "energy_mae_valid_shifted_mev")
CURVE_COLUMNS = {"energy_mae_mev": "test energy MAE (meV)",
                 "energy_mae_valid_shifted_mev": "test energy MAE, validation offset removed (meV)",
                 "force_mae_mev_per_a": "test force MAE (meV/Å)"}


def collect_rows(config: BenchConfig, layout: BenchLayout) -> list[dict]:
    """runs.csv rows of every finished run, then the rows of the methods that train nothing (``select``:
    within their own budgets and seeds)."""
    rows = []
    for run in plan_runs(config):
        done = read_done(layout.run_dir(run) / DONE)
        if done is not None:
            rows.append({column: done[column] for column in CSV_COLUMNS if column in done})
    for method in config.methods:
        rows += method.derived_rows(rows)
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
            learning_curve_figure(rows, [m.name for m in config.methods]).savefig(tmp, format="png", dpi=120)
    return {key: str(path) for key, path in outputs.items()}


def aggregate(rows: Sequence[dict], method: str, n_train: int, baseline: str | None) -> dict:
    """Mean ± sd over seeds of one method at one budget, and paired % differences to the baseline
    (``delta_<column>``: mean, sd, number of pairs)."""
    mine = {r["seed"]: r for r in rows if r["method"] == method and r["n_train"] == n_train}
    base = {r["seed"]: r for r in rows if r["method"] == baseline and r["n_train"] == n_train}
    result = {"n_seeds": len(mine)}
    for column in MEAN_COLUMNS:
        result[column] = mean_sd([r[column] for r in mine.values() if column in r])
    for column in DELTA_COLUMNS:
        diffs = paired_percent_differences({s: r[column] for s, r in mine.items() if column in r},
                                           {s: r[column] for s, r in base.items() if column in r})
        result[f"delta_{column}"] = mean_sd(diffs) + (len(diffs),)
    return result


def plus_minus(pair: tuple, digits: int = 1, sign: bool = False) -> str:
    """'mean ± sd' with ``digits`` decimals ('–' for no mean, the mean alone for no sd)."""
    mean, sd = pair[0], pair[1]
    if math.isnan(mean):
        return "–"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text if math.isnan(sd) else f"{text} ± {sd:.{digits}f}"


def summary_markdown(config: BenchConfig, rows: Sequence[dict]) -> str:
    """The summary table (mean ± sd over seeds per method × N, paired % difference to the baseline)."""
    lines = [*_header(config),
             "| method | setting | N | seeds | E MAE (meV) | E MAE (meV/atom) | F MAE (meV/Å) | ΔE vs baseline (%) "
             "| ΔF vs baseline (%) | E MAE shifted (meV) | ΔE shifted (%) | valid E MAE (meV) | valid E MAE shifted (meV) "
             "| valid F MAE (meV/Å) | train time (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in config.methods:
        for n in sorted({r["n_train"] for r in rows if r["method"] == method.name}):
            lines.append(_table_row(config, method, n, aggregate(rows, method.name, n, config.baseline)))
    for method in config.methods:
        lines += method.summary_notes(rows)
    trained = [r for r in rows if config.method(r["method"]).trains]
    devices = sorted({str(r.get("device")) for r in rows})
    lines += ["", f"Runs finished: {len(trained)} of {len(plan_runs(config))}; device(s): {', '.join(devices) or '–'}; "
              f"total training time {sum(float(r['wall_time_s']) for r in trained):.0f} s.", ""]
    return "\n".join(lines)


def shown_command(argv: Sequence[str]) -> list[str]:
    """A command line as a record a reader can follow: every absolute path in it as ``shown_path`` gives it."""
    return [shown_path(Path(arg)) if Path(arg).is_absolute() else arg for arg in argv]


def shown_path(path: Path, start: Path | None = None) -> str:
    """``path`` as a reader can follow it: relative to ``start`` (default: the working directory, where the
    bench ran), unless the two share no folder but the file-system root: then absolute.

    The paths of a config are resolved relative to its file; ``../shared/m.model`` typed from the
    repository root reads the same again here, not as the machine's absolute path.
    """
    path, start = Path(os.path.abspath(path)), Path(os.path.abspath(start or Path.cwd()))
    if path.parts[:2] != start.parts[:2]:
        return str(path)
    return os.path.relpath(path, start)


def _header(config: BenchConfig) -> list[str]:
    """The title and the paragraphs above the summary table (paths as ``shown_path`` gives them)."""
    split = config.split
    targets = ", ".join(f"`{shown_path(p)}`" for p in config.target_files)
    return [
        f"# Bench {config.name}", "",
        f"Foundation model `{shown_path(config.foundation_model)}`; target {targets}; "
        f"time-separated split per file: pool frames [{split.pool[0]}, {split.pool[1]}), validation "
        f"[{split.valid[0]}, {split.valid[1]}) every {split.valid_stride}, test [{split.test[0]}, {split.test[1]}). "
        "Training sets: the first N of a seeded permutation of the pool (nested over N for one seed).",
        "",
        f"Shared mace_run_train arguments: `{' '.join(config.mace_args)}`.",
        "Each run's model is the one mace writes (lowest validation loss; EMA weights with --ema; stage two's after --swa; "
        "E0s refit on the training split with refit_offset), evaluated in "
        "float64 with MACECalculator on the test set. Errors: mean ± sd over seeds (no sd for one seed); Δ: paired per-seed "
        f"difference to `{config.baseline}` in %, mean ± sd (negative = better). E MAE shifted: the test energy MAE after "
        "subtracting the model's mean validation error, i.e. without a constant offset (chosen without the test set).",
        *(["", config.notes] if config.notes else []),
        "",
    ]


def _table_row(config: BenchConfig, method, n_train: int, stats: dict) -> str:
    """One line of the summary table: a method at budget ``n_train`` (``stats`` from ``aggregate``)."""
    is_base = method.name == config.baseline
    setting = method.setting if method.trains else "see below"

    def delta(column: str) -> str:
        return "–" if is_base else plus_minus(stats[f"delta_{column}"], sign=True)

    return (f"| {method.name} | {setting or '–'} | {n_train} | {stats['n_seeds']} | {plus_minus(stats['energy_mae_mev'])} | "
            f"{plus_minus(stats['energy_mae_mev_per_atom'], 2)} | {plus_minus(stats['force_mae_mev_per_a'])} | "
            f"{delta('energy_mae_mev')} | {delta('force_mae_mev_per_a')} | "
            f"{plus_minus(stats['energy_mae_valid_shifted_mev'])} | {delta('energy_mae_valid_shifted_mev')} | "
            f"{plus_minus(stats['valid_energy_mae_mev'], 2)} | {plus_minus(stats['valid_energy_mae_shifted_mev'], 2)} | "
            f"{plus_minus(stats['valid_force_mae_mev_per_a'], 2)} | {stats['wall_time_s'][0]:.0f} |")


def plain_number_formatter():
    """A tick formatter that labels each tick with its whole value in plain digits: no offset or power of ten
    kept apart from the labels (matplotlib draws none for minor ticks, so "0.070" stood for 756.670 meV)."""
    from matplotlib.ticker import ScalarFormatter

    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    return formatter


def learning_curve_figure(rows: Sequence[dict], methods: Sequence[str]):
    """Test energy MAE, energy MAE without the validation offset, and force MAE vs N (log-log), mean ± sd
    over seeds, one line per method (a matplotlib Figure; ticks labelled with their true values).

    Methods are drawn with distinct markers and a small horizontal offset so identical curves stay visible.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    figure = Figure(figsize=(15, 4), layout="tight")
    axes = figure.subplots(1, len(CURVE_COLUMNS))
    drawn = [m for m in methods if any(r["method"] == m for r in rows)]
    for position, method in enumerate(drawn):
        budgets = sorted({r["n_train"] for r in rows if r["method"] == method})
        offset = 1.0 + 0.015 * (position - (len(drawn) - 1) / 2)
        for axis, column in zip(axes, CURVE_COLUMNS):
            stats = [mean_sd([r[column] for r in rows if r["method"] == method and r["n_train"] == n and column in r])
                     for n in budgets]
            axis.errorbar([n * offset for n in budgets], [s[0] for s in stats], yerr=[np.nan_to_num(s[1]) for s in stats],
                          marker="osD^vP*X"[position % 8], linestyle=("-", "--", ":", "-.")[position % 4], capsize=3,
                          label=method)
    all_budgets = sorted({r["n_train"] for r in rows})
    for axis, (column, label) in zip(axes, CURVE_COLUMNS.items()):
        axis.set_xscale("log")
        if any((r.get(column) or 0) > 0 for r in rows):  # runs finished before a metric existed may lack it
            axis.set_yscale("log")
        else:
            axis.text(0.5, 0.5, "no finished run has this metric", transform=axis.transAxes, ha="center")
        axis.set_xticks(all_budgets, [str(n) for n in all_budgets])  # the budgets, and only they, on the N axis
        axis.xaxis.set_minor_locator(NullLocator())
        axis.yaxis.set_major_formatter(plain_number_formatter())
        axis.yaxis.set_minor_formatter(plain_number_formatter())
        axis.set_xlabel("training configurations N")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    return figure
