"""The one exception type for bad input: its message names the problem and the fix, in one line."""


class UsageError(Exception):
    """A problem with what the user gave us (a file, a config value, a checkpoint).

    The CLI prints the message as one line, exits non-zero and shows no traceback (unless --debug).
    """
