"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(ValueError):
    """Bad input: the CLI prints the message on one line and exits with code 2.

    Messages say what was wrong and how to fix it.
    """


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite): one line, exit 1, checkpoints kept."""
