"""``protoalign diagnose``: can this target trust these prototypes?"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from protoalign_cli.cli.options import batch_size_option, device_option, one_spelling, overwrite_option
from protoalign_cli.diagnose.settings import (
    DEFAULT_ENERGY_KEY,
    DEFAULT_MAP_METHOD,
    DEFAULT_RADIUS_FACTOR,
    DEFAULT_SPREAD_THRESHOLD_MEV,
    MAP_METHODS,
)

COVERAGE_FAILURE_EXIT = 2


@click.command("diagnose")
@click.option("--prototypes", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Prototype file from `protoalign prototypes`.")
@click.option("--configs", "configs", multiple=True, required=True, metavar="FILE",
              help="Target structure file ASE reads (extxyz, ...); repeat for several.")
@click.option("--finetuned-model", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Fine-tuned MACE model: compare its per-atom energies with the prototype energies.")
@click.option("--finetuned-head", default=None, help="Head of the fine-tuned model (default: its first head).")
@click.option("--model", "old_model", default=None, hidden=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Old spelling of --finetuned-model.")
@click.option("--model-head", "old_model_head", default=None, hidden=True, help="Old spelling of --finetuned-head.")
@click.option("--foundation-model", default=None, metavar="PATH|NAME",
              help="Pretrained model the prototypes were built from (default: the prototype file's model path); "
                   "must match its sha256.")
@click.option("--energy-key", default=None,
              help=f"Info key of the reference energy (eV) [default: {DEFAULT_ENERGY_KEY}; if absent the predictor is "
                   "skipped, while an explicitly given key that no configuration has is an error].")
@click.option("--map", "map_method", type=click.Choice(MAP_METHODS), default=DEFAULT_MAP_METHOD, show_default=True,
              help="2-D map of the latent space (tsne needs scikit-learn).")
@click.option("--radius-factor", type=float, default=DEFAULT_RADIUS_FACTOR, show_default=True,
              help="An atom is covered when distance <= factor x radius of its nearest prototype.")
@click.option("--spread-threshold", "spread_threshold", type=float, default=DEFAULT_SPREAD_THRESHOLD_MEV,
              show_default=True, help="Flag prototypes whose source members' energy std exceeds this (meV).")
@click.option("--fail-below-coverage", type=float, default=None, metavar="X",
              help=f"Exit with status {COVERAGE_FAILURE_EXIT} (after writing the report) when coverage < X.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write report.json, report.md and the figures into.")
@device_option
@batch_size_option
@overwrite_option
def diagnose_command(prototypes, configs, finetuned_model, finetuned_head, old_model, old_model_head, foundation_model,
                     energy_key, map_method, radius_factor, spread_threshold, fail_below_coverage, out, device,
                     batch_size, overwrite):
    """Coverage, energy consistency and spread of PROTOTYPES for a target; a report in OUT.

    \b
    protoalign diagnose --prototypes prototypes.h5 --configs target.xyz --out diagnosis
    # also compare a fine-tuned model's per-atom energies with the prototypes':
    protoalign diagnose --prototypes prototypes.h5 --configs target.xyz --out diagnosis \\
        --finetuned-model finetuned.model --overwrite

    Exit status 0 whatever the verdict (unless --fail-below-coverage); see docs/diagnose.md.
    """
    from protoalign_cli.diagnose import DiagnoseRequest, run_diagnose

    model = one_spelling("--finetuned-model", finetuned_model, "--model", old_model)
    model_head = one_spelling("--finetuned-head", finetuned_head, "--model-head", old_model_head)
    request = DiagnoseRequest(
        prototypes=prototypes, configs=[Path(c) for c in configs], out=out, model=model, model_head=model_head,
        foundation_model=foundation_model, energy_key=energy_key, map_method=map_method,
        radius_factor=radius_factor, spread_threshold_meV=spread_threshold,
        fail_below_coverage=fail_below_coverage, device=device, batch_size=batch_size, overwrite=overwrite,
    )
    results = run_diagnose(request)
    for line in results.verdict:
        click.echo(line)
    click.echo(f"report: {out / 'report.md'}")
    if fail_below_coverage is not None and results.coverage.overall < fail_below_coverage:
        click.echo(f"Error: coverage {results.coverage.overall:.3f} is below {fail_below_coverage:g}", err=True)
        sys.exit(COVERAGE_FAILURE_EXIT)


COMMANDS = [diagnose_command]
