"""What a tune's report says beyond its records (``report.write_report``'s ``info``): the validation scheme in
words, the command that reproduces best.model on the user's files, the skipped candidates, the provenance."""

from __future__ import annotations

import shlex
from pathlib import Path

from protoalign_cli.tune.choose import RETRAIN_FOLD
from protoalign_cli.tune.data import HOLDOUT
from protoalign_cli.tune.plan import TunePlan
from protoalign_cli.tune.settings import INPUT_FILES, read_record

REPRODUCE_DIR = "best_run"  # the work folder the reproducing command trains in


def report_info(plan: TunePlan, winner: str, final: dict) -> dict:
    """The ``info`` of ``report.write_report``: ``final`` is the record of the model copied to best.model (the
    winner's final retrain with --folds, else its validation task)."""
    settings = plan.settings
    return {
        "winner": winner, "best_model": plan.layout.relative(plan.layout.best_model),
        "retrained_on_all": final["fold"] == RETRAIN_FOLD,
        "criterion": {"energy_weight": settings.energy_weight, "forces_weight": settings.forces_weight},
        "validation": validation_info(plan, winner), "reproduce": reproduce_info(plan, winner, final),
        "skipped": list(plan.skipped), "provenance": provenance(plan), "settings": read_record(plan.layout.out),
    }


def validation_info(plan: TunePlan, winner: str) -> dict:
    """The validation scheme: mode, a sentence, sizes (from the winner's records), folds and order key."""
    from protoalign_cli.bench.report import shown_path
    from protoalign_cli.bench.layout import read_done

    settings = plan.settings
    records = [read_done(plan.done_path(winner, fold)) for fold in plan.folds]
    order = f"ordered by info['{settings.order_key}']" if settings.order_key else "in file order"
    train = f"`{shown_path(settings.train)}`"
    if settings.validation_mode == "file":
        detail = f"trained on {train}, validated on `{shown_path(settings.valid)}`"
    elif settings.validation_mode == "fraction":
        detail = (f"validated on the last {settings.valid_fraction:g} (rounded up) of the configurations of {train} "
                  f"{order}, trained on the others")
    else:
        detail = (f"{settings.folds}-fold: the configurations of {train} {order} cut into {settings.folds} "
                  "contiguous blocks, each block validating the candidates trained on the others")
    folds = settings.folds is not None
    return {"mode": settings.validation_mode, "detail": detail,
            "n_train": sum(r["n_valid"] for r in records) if folds else records[0]["n_train"],
            "n_valid": None if folds else records[0]["n_valid"], "folds": settings.folds,
            "order_key": settings.order_key}


def reproduce_info(plan: TunePlan, winner: str, final: dict) -> dict:
    """The shell command that trains best.model's training again (on the user's files where the training used all
    of one: --train, --valid), and a note on what it gives."""
    from protoalign_cli.bench.report import shown_path

    settings, layout, fold = plan.settings, plan.layout, final["fold"]
    argv = plan.command(winner, fold, final.get("retrain_epochs"))
    own_files = {str(layout.train_file(RETRAIN_FOLD)): settings.train}
    if settings.validation_mode == "file":
        own_files = {str(layout.train_file(HOLDOUT)): settings.train, str(layout.valid_file(HOLDOUT)): settings.valid}
    words = [Path(argv[0]).name]
    for previous, arg in zip(argv, argv[1:]):
        path = own_files.get(arg, Path(arg) if Path(arg).is_absolute() else None)
        words.append(REPRODUCE_DIR if previous == "--work_dir" else shown_path(path) if path is not None else arg)
    model = f"{REPRODUCE_DIR}/{Path(final['model']).name.replace('_refit', '')}"
    note = f"It trains `{winner}` again (seed 0) into `{REPRODUCE_DIR}/`; the model is `{model}`"
    if fold == RETRAIN_FOLD:
        note += (" (the retrain on every configuration, for the folds' mean best epoch + 1 epochs without early "
                 "stop; mace needs a validation file: it is the training file, so nothing is held out and mace keeps "
                 "the epoch of lowest loss on the training configurations)")
    if plan.method(winner).refit_offset:
        note += (". best.model is that model with its E0s refit on the training configurations afterwards "
                 "(protoalign_cli.mace.offset.refit_model_offset; `protoalign finetune --refit-offset` does the same)")
    return {"command": shlex.join(words), "note": note + "."}


def provenance(plan: TunePlan) -> dict:
    """The input files (paths as a reader follows them, sha256) and the software and machine of this call."""
    from protoalign_cli.bench.report import shown_path
    from protoalign_cli.io.provenance import run_summary

    record, summary = read_record(plan.layout.out), run_summary("tune", {})
    files = {name: {"path": shown_path(Path(record[name])), "sha256": record["sha256"][name]}
             for name in INPUT_FILES if record[name] is not None}
    return {**files, "protoalign": summary["protoalign_version"], "versions": summary["versions"],
            "python": summary["python"], "host": summary["host"], "command": summary["command_line"]}
