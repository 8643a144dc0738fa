"""``protoalign prototypes`` (being built)."""

COMMANDS: list = []
