"""``protoalign bench`` (being built)."""

COMMANDS: list = []
