"""The one exception type that the command line turns into a one-line error."""


class ProtoalignError(Exception):
    """A user-facing error: bad input, incompatible files, impossible settings.

    The CLI prints ``Error: <message>`` on one line and exits with status 1; the message must
    say what is wrong and, where possible, what to do about it.
    """
