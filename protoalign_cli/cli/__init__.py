"""The ``protoalign`` command line: a thin click layer that parses options and delegates.

Every command lives in its own module here and calls into the library module of its stage.
Heavy imports (torch, mace) happen inside command bodies so that ``--help`` is instant.
"""

from __future__ import annotations

import sys

import click

from protoalign_cli import __version__
from protoalign_cli.errors import ProtoalignError


INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class ProtoalignGroup(click.Group):
    """A click group that turns ProtoalignError into a one-line message and exit status 1.

    Ctrl-C (KeyboardInterrupt, also SIGTERM where a command turns it into one) gives
    ``Error: interrupted`` and exit status 130; a library that keeps something for later passes
    the detail as the interrupt's message (``raise KeyboardInterrupt("X kept, rerun with --resume")``).
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ProtoalignError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as exc:
            click.echo(f"Error: interrupted; {exc}" if str(exc) else "Error: interrupted", err=True)
            sys.exit(INTERRUPTED_EXIT)


@click.group(cls=ProtoalignGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="protoalign")
def main():
    """Prototype-guided latent alignment for fine-tuning MACE foundation models.

    Pipeline: extract (latents -> HDF5), prototypes (FAISS-indexed), finetune (mace_run_train
    with the alignment term); diagnose and bench tell whether it helps on your data.
    """


def _register() -> None:
    from protoalign_cli.cli import bench, diagnose, extract, finetune, prototypes, tune

    for module in (extract, prototypes, finetune, diagnose, bench, tune):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
