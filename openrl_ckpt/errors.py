"""User-facing errors: one line, no traceback, a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (flags, data, paths, checkpoints).

    The CLI prints ``error: <message>`` on one line and exits with ``exit_code``;
    anything else that escapes is a bug and keeps its traceback.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
