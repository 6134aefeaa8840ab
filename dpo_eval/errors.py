"""The one exception type for errors a user can cause."""


class DpoEvalError(Exception):
    """Bad input from the user: the message names the file, record or parameter and what to do."""
