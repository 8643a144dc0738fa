"""Options shared by several commands, defined once."""

from __future__ import annotations

import click

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.mace.latents import DEFAULT_BATCH_SIZE


def at_least_one(ctx, param, value):
    """Click callback: refuse an integer below 1 with ``Error: --<option> must be >= 1`` (exit status 1)."""
    if value is not None and value < 1:
        raise ProtoalignError(f"{param.opts[0]} must be >= 1")
    return value


def one_spelling(name: str, value, old_name: str, old_value):
    """The value of an option that also has a hidden old spelling (kept for existing scripts); both given is an error."""
    if value is not None and old_value is not None:
        raise ProtoalignError(f"{old_name} is the old spelling of {name}; give only {name}")
    return old_value if value is None else value


model_option = click.option(
    "--model", required=True, metavar="PATH|NAME",
    help="Pretrained MACE model whose latents are extracted: a checkpoint file, or a foundation name mace-torch "
         "downloads (small, medium, small_off, medium_off, ...).",
)
device_option = click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the model runs."
)
dtype_option = click.option(
    "--dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
    help="Floating-point precision of the model evaluation.",
)
batch_size_option = click.option(
    "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True, callback=at_least_one,
    help="Configurations per model evaluation.",
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace the output if it exists.")
