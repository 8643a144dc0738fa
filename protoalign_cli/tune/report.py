"""The outputs of a tune from its ranked candidates and task records: report.md (which candidate won, why, the
candidate table, how to reproduce it), report.json (the same as data) and validation_curves.png (mace's
per-epoch validation errors, one line per training)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from protoalign_cli.bench.report import plain_number_formatter, plus_minus
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io.outputs import atomic_output
from protoalign_cli.tune.choose import RETRAIN_FOLD, CandidateResult, fold_order

REPORT_MD, REPORT_JSON, CURVES_PNG = "report.md", "report.json", "validation_curves.png"
SCORE_FORMULA = "(w_E * E / E_best + w_F * F / F_best) / (w_E + w_F)"
# mace's per-epoch error keys (eV, eV/atom, eV/Å; which are logged depends on its --error_table), the first
# one logged is drawn: (key, axis label of the value times 1000)
ENERGY_CURVE_KEYS = (("mae_e", "energy MAE (meV)"), ("rmse_e", "energy RMSE (meV)"),
                     ("mae_e_per_atom", "energy MAE (meV/atom)"), ("rmse_e_per_atom", "energy RMSE (meV/atom)"))
FORCE_CURVE_KEYS = (("mae_f", "force MAE (meV/Å)"), ("rmse_f", "force RMSE (meV/Å)"))
TASK_COLUMNS = ("candidate", "fold", "setting", "n_train", "n_valid", "valid_energy_mae_mev",
                "valid_energy_mae_per_atom_mev", "valid_force_mae_mev_per_a", "valid_energy_mean_error_mev",
                "best_epoch", "epochs_run", "wall_time_s", "model", "curve", "trained_by")


@dataclasses.dataclass(frozen=True)
class Curve:
    """One training's validation errors per epoch, averaged over its folds.

    ``names``: the candidates evaluated on this training (a refit twin shares its twin's); ``epochs``: epochs
    trained (0: before training); ``energy``, ``force``: mace's logged errors times 1000 (meV or meV/atom,
    meV/Å); ``kept_epoch``: epochs trained when mace saved the model kept (mean over folds), None if unknown.
    """

    names: tuple[str, ...]
    epochs: tuple[int, ...]
    energy: tuple[float, ...]
    force: tuple[float, ...]
    kept_epoch: int | None
    n_folds: int


def write_report(out: Path, ranked: Sequence[CandidateResult], records: Sequence[dict], info: dict) -> dict[str, Path]:
    """Write OUT/report.md, OUT/report.json and OUT/validation_curves.png (each atomically, replacing an
    earlier one); return their paths by key ("report_md", "report_json", "curves"; "curves" is None when no
    record names a per-epoch log).

    ``ranked``: ``choose.rank_candidates`` of the validation records, best first; ``records``: every task's
    done.json (the final retrain's included); ``info``: what tune knows beyond them (see tune_interface).
    """
    out = Path(out)
    if not any(result.name == info["winner"] for result in ranked):
        raise ProtoalignError(f"the winner {info['winner']} is not among the ranked candidates")
    curves, energy_label, force_label = training_curves(out, ranked, records)
    paths = {"report_md": out / REPORT_MD, "report_json": out / REPORT_JSON,
             "curves": out / CURVES_PNG if curves else None}
    if curves:
        figure = curves_figure(curves, info["winner"], energy_label, force_label)
        with atomic_output(paths["curves"], overwrite=True) as tmp:
            figure.savefig(tmp, format="png", dpi=120)
    data = report_data(ranked, records, info, paths["curves"] is not None)
    with atomic_output(paths["report_json"], overwrite=True) as tmp:
        tmp.write_text(json.dumps(finite_or_none(data), indent=2, default=str) + "\n")
    with atomic_output(paths["report_md"], overwrite=True) as tmp:
        tmp.write_text(report_markdown(ranked, records, info, paths["curves"] is not None))
    return paths


# ----------------------------------------------------------------------------- report.json

def report_data(ranked: Sequence[CandidateResult], records: Sequence[dict], info: dict, has_curves: bool) -> dict:
    """report.json: the choice, the criterion, every candidate (best first) and task, and tune's info."""
    best_energy, best_force = best_errors(ranked)
    return {
        "winner": info["winner"], "best_model": info["best_model"], "retrained_on_all": info["retrained_on_all"],
        "criterion": {**info["criterion"], "score": SCORE_FORMULA, "best_energy_mae_mev": best_energy,
                      "best_force_mae_mev_per_a": best_force},
        "candidates": [{"rank": rank, **dataclasses.asdict(result)} for rank, result in enumerate(ranked, 1)],
        "tasks": [{column: record.get(column) for column in TASK_COLUMNS}
                  for record in sorted(records, key=lambda r: (r["candidate"], fold_order(r["fold"])))],
        "skipped": list(info["skipped"]), "validation": info["validation"], "reproduce": info["reproduce"],
        "provenance": info["provenance"], "settings": info["settings"],
        "files": {"report_md": REPORT_MD, "curves": CURVES_PNG if has_curves else None},
    }


def finite_or_none(value):
    """``value`` with every nan or infinite float (at any depth) replaced by None, so that it is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def best_errors(ranked: Sequence[CandidateResult]) -> tuple[float, float]:
    """E_best (meV) and F_best (meV/Å) of the criterion: the lowest finite mean validation errors."""
    finite = [r for r in ranked if math.isfinite(r.score)]
    return (min(r.valid_energy_mae_mev for r in finite), min(r.valid_force_mae_mev_per_a for r in finite))


# ----------------------------------------------------------------------------- report.md

def report_markdown(ranked: Sequence[CandidateResult], records: Sequence[dict], info: dict, has_curves: bool) -> str:
    """report.md: the answer first (winner, its errors, why), then the table, skipped candidates, the command
    that reproduces best.model, the validation scheme, the curves and the provenance."""
    winner = next(result for result in ranked if result.name == info["winner"])
    lines = [f"# protoalign tune: `{winner.name}` is the best of {len(ranked)} candidates", "",
             *_answer(winner, ranked, records, info), "", "## Candidates", "", *candidate_table(ranked, winner.name),
             "", "## Skipped", "", *([f"- {line}" for line in info["skipped"]] or ["None."]),
             "", "## Reproduce best.model", "", "```bash", info["reproduce"]["command"], "```"]
    if info["reproduce"].get("note"):
        lines += ["", info["reproduce"]["note"]]
    lines += ["", "## Validation", "", *_validation_lines(info["validation"]), "", "## Validation curves", ""]
    lines += ([f"![validation curves]({CURVES_PNG})", "",
               "mace's per-epoch errors on each candidate's validation set (mean over folds, over the epochs all "
               "folds ran; epoch 0: before training), log scale; the winner drawn thick; a circle marks the epoch "
               "of the model mace kept. A refit candidate shares its twin's curve (the refit comes after "
               "training)."] if has_curves else ["No per-epoch logs were found."])
    lines += ["", "## Provenance", "", *_provenance_lines(info["provenance"]),
              "", "The settings of this tune are in `tune.json` (and in report.json).", ""]
    return "\n".join(lines)


def _answer(winner: CandidateResult, ranked: Sequence[CandidateResult], records: Sequence[dict],
            info: dict) -> list[str]:
    """The paragraphs that answer the question: which model to use, its validation errors, and why it won."""
    folds = f"mean ± sd over {winner.n_folds} folds" if winner.n_folds > 1 else "one validation set"
    per_atom = _mean_of(records, winner.name, "valid_energy_mae_per_atom_mev")
    per_atom_text = f" ({per_atom:.2f} meV/atom)" if per_atom is not None else ""
    lines = [f"**Use `{info['best_model']}`**: candidate `{winner.name}` ({winner.setting or 'the shared recipe'}), "
             f"{_made_how(winner, records, info)}.", "",
             f"Validation errors: energy MAE {plus_minus(_pair(winner, 'energy'))} meV per configuration"
             f"{per_atom_text}, force MAE {plus_minus(_pair(winner, 'force'))} meV/Å ({folds}).", "",
             _why(winner, ranked, info["criterion"])]
    runner_up = next((r for r in ranked if r.name != winner.name), None)
    if runner_up is not None and math.isfinite(runner_up.score):
        energy = _percent(runner_up.valid_energy_mae_mev, winner.valid_energy_mae_mev)
        force = _percent(runner_up.valid_force_mae_mev_per_a, winner.valid_force_mae_mev_per_a)
        tie = "; a tie, and ties go to the name that sorts first" if runner_up.score == winner.score else ""
        lines += ["", f"Next: `{runner_up.name}` at {runner_up.score:.3f} (energy {energy}, forces {force} "
                  f"against the winner){tie}."]
    return lines


def _why(winner: CandidateResult, ranked: Sequence[CandidateResult], criterion: dict) -> str:
    """Why the winner won: the criterion with its weights and the best errors it is relative to."""
    energy_weight, forces_weight = criterion["energy_weight"], criterion["forces_weight"]
    best_energy, best_force = best_errors(ranked)
    return (f"Why: it has the lowest score, {SCORE_FORMULA} = {winner.score:.3f}, with w_E = {energy_weight:g}, "
            f"w_F = {forces_weight:g}, E and F the candidate's validation energy MAE (meV) and force MAE (meV/Å), "
            f"E_best = {best_energy:.1f} meV and F_best = {best_force:.1f} meV/Å the lowest among the candidates. "
            f"1 is the best in both; {weights_in_words(energy_weight, forces_weight)}.")


def _made_how(winner: CandidateResult, records: Sequence[dict], info: dict) -> str:
    """How best.model was made, in words."""
    if not info["retrained_on_all"]:
        return "the model of its validation task"
    retrain = next((r for r in records if r["candidate"] == winner.name and r["fold"] == RETRAIN_FOLD), None)
    epochs = retrain.get("epochs_run") if retrain else None
    size = f" {retrain['n_train']}" if retrain and retrain.get("n_train") else ""
    length = f" for {epochs} epochs" if epochs else ""
    return (f"retrained on all{size} configurations{length} after the folds chose it (its validation errors below "
            "are those of the fold models; the retrained model has seen every configuration)")


def weights_in_words(energy_weight: float, forces_weight: float) -> str:
    """What the criterion's weights trade: how much more force error buys 10 % less energy error."""
    if forces_weight == 0:
        return "with w_F = 0 only the energy error counts"
    if energy_weight == 0:
        return "with w_E = 0 only the force error counts"
    return (f"with these weights 10 % more energy error costs as much as "
            f"{10 * energy_weight / forces_weight:.3g} % more force error")


def candidate_table(ranked: Sequence[CandidateResult], winner: str) -> list[str]:
    """The markdown table of every candidate, best first, and the note below it."""
    lines = ["| candidate | setting | folds | valid E MAE (meV) | valid F MAE (meV/Å) | score | wall time (s) "
             "| best epochs |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for result in ranked:
        name = f"**{result.name}** (chosen)" if result.name == winner else result.name
        score = f"{result.score:.3f}" if math.isfinite(result.score) else "– (not finite)"
        epochs = ", ".join("–" if epoch is None else str(epoch) for epoch in result.best_epochs)
        errors = f"{plus_minus(_pair(result, 'energy'))} | {plus_minus(_pair(result, 'force'))}"
        lines.append(f"| {name} | {result.setting or 'the recipe'} | {result.n_folds} | {errors} | {score} | "
                     f"{result.wall_time_s:.0f} | {epochs} |")
    lines += ["", "Errors on each fold's validation configurations: mean ± sd over folds (no sd for one validation "
              "set); energies per configuration, raw (after the offset refit for refit candidates). Score: lower is "
              "better. Wall time: summed over folds. Best epochs: per fold, the epoch (counted from 0) of the model "
              "mace kept (lowest validation loss)."]
    return lines


def _validation_lines(validation: dict) -> list[str]:
    """How the candidates were validated, and why the split is contiguous."""
    if validation.get("folds"):
        sizes = [f"{validation['n_train']} configurations in {validation['folds']} folds"]
    else:
        sizes = [f"{validation['n_train']} training configurations"]
    if validation.get("n_valid") is not None:
        sizes.append(f"{validation['n_valid']} validation configurations")
    if validation.get("order_key"):
        sizes.append(f"ordered by `{validation['order_key']}`")
    detail = validation["detail"]
    lines = [f"{detail[:1].upper()}{detail[1:]} ({', '.join(sizes)})."]
    if validation["mode"] != "file":
        lines += ["", "Validation blocks are contiguous, never random frames: neighbouring MD frames are nearly "
                  "identical, so a random split would validate on near-copies of training frames."]
    return lines


def _provenance_lines(provenance: dict) -> list[str]:
    """Markdown bullets of the provenance mapping (nested mappings on one line each)."""
    lines = []
    for key, value in provenance.items():
        items = value.items() if isinstance(value, dict) else ()
        lines.append(f"- {key}: " + (", ".join(f"{inner} `{item}`" for inner, item in items) if items else f"`{value}`"))
    return lines or ["None recorded."]


def _pair(result: CandidateResult, quantity: str) -> tuple[float, float]:
    """(mean, sd) of a candidate's validation energy (meV) or force (meV/Å) MAE."""
    if quantity == "energy":
        return result.valid_energy_mae_mev, result.valid_energy_sd_mev
    return result.valid_force_mae_mev_per_a, result.valid_force_sd_mev_per_a


def _mean_of(records: Sequence[dict], candidate: str, column: str) -> float | None:
    """Mean of ``column`` over a candidate's validation records; None when a record lacks it."""
    values = [r.get(column) for r in records if r["candidate"] == candidate and r["fold"] != RETRAIN_FOLD]
    return float(np.mean(values)) if values and all(v is not None for v in values) else None


def _percent(value: float, reference: float) -> str:
    """``value`` relative to ``reference`` as a signed percentage, e.g. '+6 %'."""
    return f"{100 * (value - reference) / reference:+.0f} %"


# ----------------------------------------------------------------------------- validation curves

def read_eval_lines(path: Path) -> list[dict]:
    """The evaluation lines of mace's per-epoch log (results/<name>_train.txt, one JSON object per line),
    in file order; those of a replayed pretraining head ('pt_head') and a line cut short (a run killed while
    writing it) are left out."""
    lines = []
    for text in Path(path).read_text().splitlines():
        try:
            entry = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("mode") == "eval" and entry.get("head") != "pt_head":
            lines.append(entry)
    return lines


def epoch_values(lines: Sequence[dict], key: str) -> dict[int, float]:
    """``key`` times 1000 by epochs trained (mace's 'epoch' + 1; 0 for its evaluation before training, whose
    epoch is null); a later line for the same epoch (a resumed run) replaces an earlier one."""
    return {(-1 if line["epoch"] is None else int(line["epoch"])) + 1: 1000.0 * float(line[key])
            for line in lines if key in line}


def training_curves(out: Path, ranked: Sequence[CandidateResult],
                    records: Sequence[dict]) -> tuple[list[Curve], str, str]:
    """One ``Curve`` per distinct training of the ranked candidates (in ranked order), read from the records'
    "curve" files below ``out``; and the energy and force axis labels. Candidates without a log are left out."""
    groups: dict[tuple[str, ...], list[CandidateResult]] = {}
    for result in ranked:
        mine = sorted((r for r in records if r["candidate"] == result.name and r["fold"] != RETRAIN_FOLD),
                      key=lambda r: fold_order(r["fold"]))
        files = tuple(r.get("curve") for r in mine)
        if files and all(files) and all((out / f).is_file() for f in files):
            groups.setdefault(files, []).append(result)
    logs = {files: [read_eval_lines(out / f) for f in files] for files in groups}
    every_line = [line for runs in logs.values() for run in runs for line in run]
    energy_key, energy_label = _first_logged(ENERGY_CURVE_KEYS, every_line)
    force_key, force_label = _first_logged(FORCE_CURVE_KEYS, every_line)
    curves = []
    for files, results in groups.items():
        energy = [epoch_values(run, energy_key) for run in logs[files]] if energy_key else []
        force = [epoch_values(run, force_key) for run in logs[files]] if force_key else []
        epochs = sorted(set.intersection(*(set(values) for values in energy + force))) if energy + force else []
        kept = [epoch for epoch in results[0].best_epochs if epoch is not None]
        curves.append(Curve(names=tuple(r.name for r in results), epochs=tuple(epochs),
                            energy=_fold_means(energy, epochs), force=_fold_means(force, epochs),
                            kept_epoch=round(float(np.mean(kept))) + 1 if len(kept) == len(files) else None,
                            n_folds=len(files)))
    return [curve for curve in curves if curve.epochs], energy_label, force_label


def _fold_means(values: Sequence[dict[int, float]], epochs: Sequence[int]) -> tuple[float, ...]:
    """The mean over folds of per-epoch values at each of ``epochs`` (nan everywhere when nothing was logged)."""
    return tuple(float(np.mean([fold[epoch] for fold in values])) if values else math.nan for epoch in epochs)


def _first_logged(keys: Sequence[tuple[str, str]], lines: Sequence[dict]) -> tuple[str | None, str]:
    """The first (key, label) of ``keys`` that some line logs; (None, label of the first) when none does."""
    return next(((key, label) for key, label in keys if any(key in line for line in lines)), (None, keys[0][1]))


def curves_figure(curves: Sequence[Curve], winner: str, energy_label: str, force_label: str):
    """Two panels, validation energy and force error vs epochs trained (log y), one line per training in
    ranked order; the winner's thick and in black, under the others so that a training identical to it still
    shows; a circle at the epoch of the model kept (a matplotlib Figure)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, MaxNLocator

    figure = Figure(figsize=(12, 4.5), layout="constrained")
    axes = figure.subplots(1, 2)
    handles = []
    others = iter(range(len(curves)))
    for curve in curves:
        chosen = winner in curve.names
        position = 0 if chosen else next(others)
        style = ({"color": "black", "linewidth": 3.5, "zorder": 2} if chosen else
                 {"color": f"C{position % 10}", "linewidth": 1.3, "alpha": 0.9, "zorder": 3,
                  "linestyle": ("-", "--", "-.", ":")[position % 4]})
        label = ", ".join(f"{name} (chosen)" if name == winner else name for name in curve.names)
        for axis, values in zip(axes, (curve.energy, curve.force)):
            line, = axis.plot(curve.epochs, values, label=label, **style)
            if curve.kept_epoch in curve.epochs:
                axis.plot([curve.kept_epoch], [values[curve.epochs.index(curve.kept_epoch)]], marker="o",
                          markersize=10 if chosen else 6, markerfacecolor="white", markeredgecolor=style["color"],
                          markeredgewidth=1.5, zorder=style["zorder"] + 2, linestyle="none")
        handles.append(line)
    for axis, label in zip(axes, (energy_label, force_label)):
        axis.set_yscale("log")
        axis.yaxis.set_minor_locator(LogLocator(subs=(1.5, 2, 3, 4, 5, 6, 7, 8, 9)))
        axis.yaxis.set_major_formatter(plain_number_formatter())
        axis.yaxis.set_minor_formatter(plain_number_formatter())
        axis.tick_params(axis="y", which="minor", labelsize=7)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epochs trained")
        axis.set_ylabel(f"validation {label}")
        axis.grid(True, which="both", alpha=0.3)
    figure.legend(handles=handles, loc="outside right upper", fontsize=8, title="candidates, best first")
    folds = max(curve.n_folds for curve in curves)
    averaged = f"mean over {folds} folds; " if folds > 1 else ""
    figure.suptitle(f"Validation errors during training ({averaged}○: the model mace kept)", fontsize=11)
    return figure
