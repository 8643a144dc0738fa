"""``protoalign extract`` and ``protoalign merge-latents``."""

from __future__ import annotations

from pathlib import Path

import click

from protoalign_cli.cli.options import (
    batch_size_option,
    device_option,
    dtype_option,
    model_option,
    overwrite_option,
)


@click.command("extract")
@model_option
@click.option("--configs", "configs", multiple=True, required=True, metavar="FILE",
              help="Structure file ASE reads (extxyz, ...); repeat for several.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Latent HDF5 file to write (a run summary goes next to it as OUT.json).")
@device_option
@dtype_option
@batch_size_option
@click.option("--head", default=None, help="Head of a multi-head model (default: its first head).")
@click.option("--max-configs", type=int, default=None, help="Use only the first N configurations (over all files).")
@click.option("--shard", default=None, metavar="I/N",
              help="Take every N-th selected configuration starting at I (SLURM arrays; join with merge-latents).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (Ctrl-C, SIGTERM) from its .OUT.partial file.")
@overwrite_option
def extract_command(model, configs, out, device, dtype, batch_size, head, max_configs, shard, resume, overwrite):
    """Per-atom latents of a MACE model over structure files, streamed into an HDF5 file.

    \b
    protoalign extract --model foundation.model --configs source.xyz --out latents.h5
    # SLURM array of 8 tasks, then one merge:
    protoalign extract --model small_off --configs source.xyz \\
        --shard $SLURM_ARRAY_TASK_ID/8 --out latents_$SLURM_ARRAY_TASK_ID.h5 --resume
    protoalign merge-latents latents_*.h5 --out latents.h5

    Per atom: the 0e node features after every interaction block, then the per-readout
    energies (eV); see docs/schema.md. Progress goes to stderr: a bar on a terminal, a line
    every few seconds in a log file. Ctrl-C or SIGTERM (exit status 130) keeps the work done for --resume.
    """
    from protoalign_cli.extract import ExtractRequest, run_extract
    from protoalign_cli.io.structures import parse_shard

    request = ExtractRequest(
        model=model, configs=[Path(c) for c in configs], out=out, device=device, dtype=dtype,
        batch_size=batch_size, head=head, max_configs=max_configs, shard=parse_shard(shard),
        resume=resume, overwrite=overwrite,
    )
    result = run_extract(request)
    click.echo(f"wrote {result['n_atoms']} atoms of {result['n_configs']} configurations to {result['out']}")


@click.command("merge-latents")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Merged latent file.")
@overwrite_option
def merge_command(inputs, out, overwrite):
    """Concatenate latent files of the same model (e.g. the shards of an array job).

    \b
    protoalign merge-latents latents_0.h5 latents_1.h5 latents_2.h5 --out latents.h5
    """
    from protoalign_cli.extract import merge_latents

    result = merge_latents(list(inputs), out, overwrite)
    click.echo(f"merged {len(inputs)} files, {result['n_atoms']} atoms, into {result['out']}")


COMMANDS = [extract_command, merge_command]
