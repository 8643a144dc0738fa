"""``protoalign tune``: the best model your labels can give, chosen on your data, and why."""

from __future__ import annotations

from pathlib import Path

import click

from protoalign_cli.cli.options import at_least_one
from protoalign_cli.errors import ProtoalignError
from protoalign_cli.tune import (DEFAULT_CANDIDATES, DEFAULT_ENERGY_KEY, DEFAULT_ENERGY_WEIGHT, DEFAULT_FORCES_KEY,
                                 DEFAULT_FORCES_WEIGHT, DEFAULT_VALID_FRACTION)

FILE = click.Path(path_type=Path)  # checked by the library: one Error line for a folder or a missing file


@click.command("tune")
@click.option("--foundation-model", type=FILE, help="The MACE foundation model (checkpoint file) to fine-tune.")
@click.option("--train", type=FILE, help="Your labelled configurations (extxyz or any file ASE reads).")
@click.option("--valid", type=FILE, help="Validate on this file instead of a part of --train.")
@click.option("--valid-fraction", type=float, default=None,
              help=f"Validate on the LAST contiguous block of this fraction of --train (rounded up) "
                   f"[default: {DEFAULT_VALID_FRACTION:g} when neither --valid nor --folds is given].")
@click.option("--folds", type=int, default=None, metavar="K",
              help="Validate on K contiguous blocks of --train in turn (each candidate trains K times), then "
                   "retrain the winner on everything; for small data (N <= 25 or so).")
@click.option("--order-key", default=None, metavar="KEY",
              help="Order --train by atoms.info[KEY] (e.g. a time) before cutting blocks, instead of file order.")
@click.option("--prototypes", type=FILE, help="Prototype file (protoalign prototypes) of the foundation model: "
                                              "adds the alignment candidates, if protoalign diagnose expects a gain.")
@click.option("--keep-alignment", is_flag=True, help="Train the alignment candidates even when diagnose expects no gain.")
@click.option("--candidates", default=DEFAULT_CANDIDATES, show_default=True, metavar="default|FILE.yaml",
              help="The candidates: the default set (see --show-candidates) or a YAML file in the bench's method syntax.")
@click.option("--show-candidates", is_flag=True, help="Print the default candidates as YAML (to copy and edit) and exit.")
@click.option("--energy-weight", type=float, default=DEFAULT_ENERGY_WEIGHT, show_default=True,
              help="w_E of the criterion (see above).")
@click.option("--forces-weight", type=float, default=DEFAULT_FORCES_WEIGHT, show_default=True,
              help="w_F of the criterion (see above).")
@click.option("--max-epochs", type=int, default=None, metavar="E",
              help="Bound every candidate's training to E epochs (its stage two's start scaled, its patience capped).")
@click.option("--energy-key", default=DEFAULT_ENERGY_KEY, show_default=True, help="Info key of the energies (eV).")
@click.option("--forces-key", default=DEFAULT_FORCES_KEY, show_default=True, help="Array key of the forces (eV/Å).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where mace trains and the models are evaluated.")
@click.option("--jobs", type=int, default=1, show_default=True, callback=at_least_one, help="Trainings at once.")
@click.option("--slurm", is_flag=True, help="Prepare, then write OUT/tune.sbatch (an array job, one task per "
                                            "training) instead of training here.")
@click.option("--sbatch-option", "sbatch_options", multiple=True, metavar="TEXT",
              help="With --slurm: an extra #SBATCH line (repeatable), e.g. --sbatch-option=--gres=gpu:1.")
@click.option("--out", type=FILE,
              help="Output folder. Rerunning the same command resumes: finished trainings are kept.")
@click.option("--task", type=int, default=None, help="Run only this task of OUT (what each subprocess and array task calls).")
def tune_command(foundation_model, train, valid, valid_fraction, folds, order_key, prototypes, keep_alignment,
                 candidates, show_candidates, energy_weight, forces_weight, max_epochs, energy_key, forces_key, device,
                 jobs, slurm, sbatch_options, out, task):
    """Fine-tune a foundation model on your labelled configurations with several candidate recipes and keep the
    one that does best on validation configurations held out from them.

    \b
    protoalign tune --foundation-model foundation.model --train train.xyz --out tune_out
    protoalign tune --foundation-model foundation.model --train train.xyz --folds 5 --jobs 2 --out tune_out
    protoalign tune --show-candidates > my_candidates.yaml     # edit, then --candidates my_candidates.yaml
    # on a cluster: write OUT/tune.sbatch, submit it, then rerun without --slurm to choose
    protoalign tune --foundation-model m.model --train train.xyz --slurm --sbatch-option=--gres=gpu:1 --out tune_out

    \b
    Validation data are contiguous blocks of --train, never random frames: neighbouring MD frames are
    nearly identical, and a random split would validate on near-copies of training frames.

    \b
    The criterion: per candidate the validation energy MAE E (meV per configuration, after the offset
    refit for refit candidates) and force MAE F (meV/Å), means over folds; E_best and F_best are the
    lowest among the candidates. The lowest score wins (ties: by name):
        score = (w_E * E / E_best + w_F * F / F_best) / (w_E + w_F)
    1 is the best in both. With the defaults, 10 % more energy error costs as much as 10 % more force error.

    Writes OUT/best.model, OUT/report.md and report.json (the candidate table, why the winner won, the
    command that reproduces it), validation_curves.png. See docs/tune.md.
    """
    from protoalign_cli.tune.candidates import DEFAULT_CANDIDATES_YAML

    if show_candidates:
        click.echo(DEFAULT_CANDIDATES_YAML, nl=False)
        return
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    if task is not None:
        from protoalign_cli.tune.plan import load_plan
        from protoalign_cli.tune.task import execute_task

        if out is None:
            raise ProtoalignError("--task needs --out (the folder protoalign tune prepared)")
        for record in execute_task(load_plan(out), task):
            click.echo(f"{record['candidate']} {record['fold']}: done")
        return
    missing = [name for name, value in (("--foundation-model", foundation_model), ("--train", train), ("--out", out))
               if value is None]
    if missing:
        raise ProtoalignError(f"missing option(s) {', '.join(missing)}: protoalign tune --foundation-model MODEL "
                              "--train TRAIN.xyz --out FOLDER")
    from protoalign_cli.bench.report import shown_path
    from protoalign_cli.tune.run import run_tune, write_slurm_script
    from protoalign_cli.tune.settings import TuneSettings

    settings = TuneSettings(foundation_model=foundation_model, train=train, out=out, valid=valid,
                            valid_fraction=valid_fraction, order_key=order_key, folds=folds, prototypes=prototypes,
                            candidates=candidates, energy_weight=energy_weight, forces_weight=forces_weight,
                            max_epochs=max_epochs, energy_key=energy_key, forces_key=forces_key, device=device,
                            keep_alignment=keep_alignment)
    if slurm:
        script = write_slurm_script(settings, say, sbatch_options)
        if script is not None:
            click.echo(f"wrote {script}; submit it with `sbatch {script}`, then rerun this command without --slurm")
            return
        say("nothing left to train; choosing")
    result = run_tune(settings, jobs, say)
    winner = result["winner"]
    click.echo(f"chosen: {winner.name} (score {winner.score:.3f}): validation energy MAE "
               f"{winner.valid_energy_mae_mev:.1f} meV, force MAE {winner.valid_force_mae_mev_per_a:.1f} meV/Å")
    click.echo(f"best model: {shown_path(result['best_model'])}; report: {shown_path(result['report'])}")


COMMANDS = [tune_command]
