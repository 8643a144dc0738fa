"""``protoalign finetune``: mace_run_train plus the loss terms of ``protoalign_cli.terms`` and the offset refit."""

from __future__ import annotations

from pathlib import Path

import click

from click.core import ParameterSource

from protoalign_cli.cli.options import at_least_one, one_spelling
from protoalign_cli.finetune import MISSING_ELEMENT_POLICIES
from protoalign_cli.mace.latents import DEFAULT_BATCH_SIZE
from protoalign_cli.terms import TERMS


def term_options(command):
    """Add the options every registered loss term declares (``LossTerm.options``), in registry order."""
    for term in reversed(list(TERMS.values())):
        defaults = term.settings_class()
        for option in reversed(term.options):
            command = click.option(
                f"{term.option_prefix}-{option.field.replace('_', '-')}", f"{term.name}__{option.field}",
                type=click.Choice(option.choices) if option.choices else option.kind,
                default=getattr(defaults, option.field), metavar=option.metavar, help=option.help,
            )(command)
    return command


def requested_terms(ctx: click.Context, values: dict) -> dict:
    """Registry name -> settings of every term that is on by default or has an option given on the command line."""
    terms = {}
    for name, term in TERMS.items():
        keys = {option.field: f"{name}__{option.field}" for option in term.options}
        given = any(ctx.get_parameter_source(key) is not ParameterSource.DEFAULT for key in keys.values())
        if term.on_by_default or given:
            terms[name] = term.settings_class(**{field: values[key] for field, key in keys.items()})
    return terms


class FinetuneCommand(click.Command):
    """``protoalign finetune``: an unknown option before any ``--`` is most likely a mace_run_train option."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            if "--" not in args:
                exc.message = (f"No such option {exc.option_name!r}: mace_run_train options go after `--` "
                               "(protoalign finetune --prototypes P.h5 [OPTIONS] -- --name ... --train_file ...)")
            raise


@click.command("finetune", cls=FinetuneCommand, context_settings={"show_default": True})
@click.option("--prototypes", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prototype file (protoalign prototypes) built from the --foundation_model given to mace.")
@term_options
@click.option("--align-missing-elements", type=click.Choice(MISSING_ELEMENT_POLICIES),
              default=MISSING_ELEMENT_POLICIES[0],
              help="Target elements without prototypes: stop, or give their atoms weight 0 (with a warning).")
@click.option("--assignment-batch-size", type=int, default=None, callback=at_least_one,
              help="Configurations per forward pass of the pretrained model over the target data (the one-time "
                   f"assignment to prototypes; mace's own --batch_size goes after `--`).  [default: {DEFAULT_BATCH_SIZE}]")
@click.option("--batch-size", "assignment_batch_size_alias", type=int, default=None, callback=at_least_one,
              hidden=True, help="Former name of --assignment-batch-size.")
@click.option("--refit-offset/--no-refit-offset", default=False,
              help="After training, refit the fine-tuned head's E0s by least squares on the model's own residuals "
                   "over the training files (as mace's --E0s estimated does before training) and save "
                   "<name>_refit.model; forces are unchanged.")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier run in --work_dir (mace's files of the same --name and --seed, the run record).")
@click.option("--verbose", is_flag=True,
              help="Show mace_run_train's whole console log and every warning (by default: its training loop and "
                   "each distinct warning once; its log files always hold everything).")
@click.argument("mace_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def finetune_command(ctx, prototypes, align_missing_elements, assignment_batch_size, assignment_batch_size_alias,
                     refit_offset, overwrite, verbose, mace_args, **term_values):
    """Fine-tune with MACE's own trainer plus the prototype alignment term.

    \b
    protoalign finetune --prototypes P.h5 [OPTIONS] -- <any mace_run_train arguments>

    Everything after `--` goes to mace_run_train unchanged (it must include --foundation_model,
    the model the prototypes were built from). An earlier run of the same --name and --seed in
    --work_dir is refused unless --overwrite (replace it) or mace's --restart_latest (resume it).
    Under DDP launch it as `torchrun ... -m protoalign_cli.cli finetune ...`. Example:

    \b
    protoalign finetune --prototypes prototypes.h5 -- --name target --work_dir runs/target \\
        --foundation_model pretrained.model --train_file train.xyz --valid_file valid.xyz \\
        --energy_key REF_energy --forces_key REF_forces --E0s estimated --max_num_epochs 100
    """
    from protoalign_cli.finetune import FinetuneRequest, run_finetune

    batch_size = one_spelling("--assignment-batch-size", assignment_batch_size, "--batch-size",
                              assignment_batch_size_alias) or DEFAULT_BATCH_SIZE
    request = FinetuneRequest(prototypes=prototypes, mace_args=list(mace_args), terms=requested_terms(ctx, term_values),
                              missing_elements=align_missing_elements, assignment_batch_size=batch_size,
                              refit_offset=refit_offset, overwrite=overwrite, verbose=verbose)
    outcome = run_finetune(request)
    click.echo(f"fine-tuning finished: fine-tuned model {outcome['model']} (run record {outcome['record']})")


COMMANDS = [finetune_command]
