"""``protoalign finetune``: mace_run_train plus the prototype alignment term."""

from __future__ import annotations

from pathlib import Path

import click

from protoalign_cli.cli.options import batch_size_option
from protoalign_cli.finetune import MISSING_ELEMENT_POLICIES
from protoalign_cli.terms.base import DECAYS
from protoalign_cli.terms.energy_alignment import REFERENCES, WEIGHTINGS, AlignmentSettings, EnergyAlignmentTerm

ALIGN = AlignmentSettings()  # the defaults


@click.command("finetune", context_settings={"show_default": True})
@click.option("--prototypes", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prototype file (protoalign prototypes) built from the --foundation_model given to mace.")
@click.option("--align-weight", type=float, default=ALIGN.weight, metavar="LAMBDA",
              help="λ: weight of the alignment term (eV²) added to MACE's loss; 0 trains exactly as plain MACE. "
                   "The default is harmless, not helpful: on the benchmarks in docs/results.md no λ beat plain "
                   "fine-tuning. Choose it on your validation set with `protoalign bench`.")
@click.option("--align-reference", type=click.Choice(REFERENCES), default=ALIGN.reference,
              help="centered: align each atom's energy relative to the mean of its element in the batch "
                   "(insensitive to per-element offsets between levels of theory); absolute: align the energy itself.")
@click.option("--align-weighting", type=click.Choice(WEIGHTINGS), default=ALIGN.weighting,
              help="Per-atom weight from the distance d to the nearest prototype of radius R: "
                   "gaussian exp(-(d/(cutoff·R))²/2), hard 1 if d <= cutoff·R else 0.")
@click.option("--align-cutoff", type=float, default=ALIGN.cutoff, help="Multiplier on the prototype radius in the weighting.")
@click.option("--align-spread-scale", type=float, default=ALIGN.spread_scale, metavar="EV",
              help="Down-weight prototypes whose member energies spread by σ: w *= 1/(1+(σ/EV)²). Off by default.")
@click.option("--align-warmup-epochs", type=int, default=ALIGN.warmup_epochs,
              help="λ rises linearly from 0 (epoch 0) to its full value at this epoch.")
@click.option("--align-decay", type=click.Choice(DECAYS), default=ALIGN.decay, help="Decay of λ to 0 after the warmup.")
@click.option("--align-decay-epochs", type=int, default=ALIGN.decay_epochs,
              help="Epochs over which λ decays [default: mace's --max_num_epochs minus the warmup].")
@click.option("--align-missing-elements", type=click.Choice(MISSING_ELEMENT_POLICIES),
              default=MISSING_ELEMENT_POLICIES[0],
              help="Target elements without prototypes: stop, or give their atoms weight 0 (with a warning).")
@batch_size_option
@click.argument("mace_args", nargs=-1, type=click.UNPROCESSED)
def finetune_command(prototypes, align_weight, align_reference, align_weighting, align_cutoff, align_spread_scale,
                     align_warmup_epochs, align_decay, align_decay_epochs, align_missing_elements, batch_size,
                     mace_args):
    """Fine-tune with MACE's own trainer plus the prototype alignment term.

    \b
    protoalign finetune --prototypes P.h5 [OPTIONS] -- <any mace_run_train arguments>

    Everything after `--` goes to mace_run_train unchanged (it must include --foundation_model,
    the model the prototypes were built from). --batch-size is the batch of the one-time pass of
    the pretrained model over the target data. Under DDP launch it as
    `torchrun ... -m protoalign_cli finetune ...`.
    """
    from protoalign_cli.finetune import FinetuneRequest, run_finetune

    alignment = AlignmentSettings(
        weight=align_weight, warmup_epochs=align_warmup_epochs, decay=align_decay, decay_epochs=align_decay_epochs,
        weighting=align_weighting, cutoff=align_cutoff, spread_scale=align_spread_scale, reference=align_reference,
    )
    request = FinetuneRequest(prototypes=prototypes, mace_args=list(mace_args),
                              terms={EnergyAlignmentTerm.name: alignment},
                              missing_elements=align_missing_elements, batch_size=batch_size)
    outcome = run_finetune(request)
    click.echo(f"fine-tuning finished; alignment record in {outcome['record']}")


COMMANDS = [finetune_command]
