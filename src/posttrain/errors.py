"""User-facing errors.

A :class:`PosttrainError` carries a one-line message that says what is wrong and how to fix it.
The CLI prints it without a traceback and exits non-zero; anything else that escapes is a bug.
"""


class PosttrainError(Exception):
    """An error caused by the user's input or environment, reported as one line."""
