"""``protoalign finetune`` (being built)."""

COMMANDS: list = []
