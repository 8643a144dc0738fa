"""``protoalign diagnose`` (being built)."""

COMMANDS: list = []
