"""``python -m protoalign_cli.cli ...``: the command line, e.g. under ``torchrun -m protoalign_cli.cli finetune ...``."""

from protoalign_cli.cli import main

if __name__ == "__main__":
    main(prog_name="protoalign")
