"""``python -m protoalign_cli ...``: the command line, e.g. under ``torchrun -m protoalign_cli finetune ...``."""

from protoalign_cli.cli import main

if __name__ == "__main__":
    main()
