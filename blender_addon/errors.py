"""The one error type the add-on reports to a user: its message says what to do."""

from __future__ import annotations


class P2VAddonError(Exception):
    """Bad input or a failed step; ``str(error)`` is one line a user can act on."""


class StripTooLong(P2VAddonError):
    """The strip has more frames than the preference allows without a confirmation."""

    def __init__(self, message: str, frames: int, limit: int):
        super().__init__(message)
        self.frames = frames
        self.limit = limit
