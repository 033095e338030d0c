"""The one exception type for bad input (its message names the problem and the fix, in one line), and the one for
nothing to do."""


class UsageError(Exception):
    """A problem with what the user gave us (a file, a config value, a checkpoint).

    The CLI prints the message as one line, exits non-zero and shows no traceback (unless --debug).
    """


class NothingToDo(Exception):
    """The command's work is already done (a resumed run that has reached --trainer.max_steps): the CLI prints the
    message as one line and exits 0, having touched nothing."""
