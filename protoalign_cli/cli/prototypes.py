"""``protoalign prototypes``: per-element FAISS-indexed prototypes of source latents."""

from __future__ import annotations

from pathlib import Path

import click

from protoalign_cli.cli.options import overwrite_option
from protoalign_cli.prototypes.build import (
    CRITERIA,
    DEFAULT_CRITERION,
    DEFAULT_FEATURES,
    DEFAULT_K,
    DEFAULT_K_GRID,
    DEFAULT_NITER,
    DEFAULT_SAMPLE_ATOMS,
    FEATURE_CHOICES,
    PrototypesRequest,
    build_prototypes,
    summary_path,
)


@click.command("prototypes")
@click.argument("latents", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Prototype HDF5 file to write (a run summary goes next to it as OUT.json).")
@click.option("--k", "k", default=DEFAULT_K, show_default=True, metavar="K|auto",
              help="Prototypes per element, or 'auto' to choose K per element from --k-grid by --criterion.")
@click.option("--k-grid", default=",".join(map(str, DEFAULT_K_GRID)), show_default=True, metavar="K1,K2,...",
              help="Values of K tried by --k auto.")
@click.option("--criterion", type=click.Choice(CRITERIA), default=DEFAULT_CRITERION, show_default=True,
              help="Information criterion minimized by --k auto.")
@click.option("--features", type=click.Choice(FEATURE_CHOICES), default=DEFAULT_FEATURES, show_default=True,
              help="Latent blocks clustered: interaction features, per-readout energies, or both.")
@click.option("--standardize/--no-standardize", default=True, show_default=True,
              help="Per-element, per-feature z-scores before clustering (stored, reused by assignment).")
@click.option("--niter", type=int, default=DEFAULT_NITER, show_default=True, help="k-means iterations.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (k-means++ start, subsampling).")
@click.option("--sample-atoms", type=int, default=DEFAULT_SAMPLE_ATOMS, show_default=True, metavar="N",
              help="Atoms per element held in memory. An element with more is clustered (and its K chosen) on a "
                   "seeded sample of N atoms, then streamed for exact memberships and statistics. Memory is set by "
                   "N, not by the number of atoms (5 bytes per atom; docs/benchmarks.md).")
@click.option("--gpu", is_flag=True, help="Run k-means on a GPU when FAISS has GPU support (else falls back to CPU).")
@overwrite_option
def prototypes_command(latents, out, k, k_grid, criterion, features, standardize, niter, seed, sample_atoms, gpu,
                       overwrite):
    """Cluster the atoms of LATENTS files (one model and head) per element into prototypes.

    \b
    protoalign prototypes latents.h5 --out prototypes.h5             # K per element chosen by BIC
    protoalign prototypes latents_*.h5 --out prototypes.h5 --k 16    # an array job's shards, 16 per element

    LATENTS may be the shards of an extract array job (every shard, each once), without merge-latents.
    """
    request = PrototypesRequest(
        latents=list(latents), out=out, k=k, k_grid=k_grid, criterion=criterion, features=features,
        standardize=standardize, niter=niter, seed=seed, sample_atoms=sample_atoms, gpu=gpu,
        overwrite=overwrite,
    )
    summary = build_prototypes(request, report=lambda message: click.echo(message, err=True))
    per_element = ", ".join(f"Z={z}: {e['k_chosen']}" for z, e in summary["results"]["elements"].items())
    click.echo(f"wrote {summary['results']['n_prototypes']} prototypes ({per_element}) to {out}; "
               f"summary {summary_path(out)}")


COMMANDS = [prototypes_command]
