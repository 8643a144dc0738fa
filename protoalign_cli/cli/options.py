"""Options shared by several commands, defined once."""

from __future__ import annotations

import click

model_option = click.option(
    "--model", required=True, metavar="PATH|NAME",
    help="MACE checkpoint file, or a foundation name mace-torch downloads (small, medium, small_off, medium_off, ...).",
)
device_option = click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the model runs."
)
dtype_option = click.option(
    "--dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
    help="Floating-point precision of the model evaluation.",
)
batch_size_option = click.option(
    "--batch-size", type=int, default=32, show_default=True, help="Configurations per model evaluation."
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace the output if it exists.")
