"""The errors a user can act on. Each carries a one-line message; front ends print it as is."""

from .settings import SettingsError


class P2VError(Exception):
    """Base class: an edit could not be done, for a reason the message states."""


class InputError(P2VError, ValueError):
    """Input frames, depth or paths are unusable (missing, unreadable, inconsistent)."""


class ModelLoadError(P2VError):
    """A model id or folder could not be loaded.

    ``public``, when set, is the message without the loading library's own text (which can quote
    the file it choked on): what a runtime server tells a client on another machine.
    """

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = public


class GpuOutOfMemory(P2VError):
    """The device ran out of memory; the message names the setting to lower."""


class EditCancelled(P2VError):
    """The cancel flag was set; ``frames_done`` frames had been delivered."""

    def __init__(self, frames_done: int):
        super().__init__(f"cancelled after {frames_done} frame(s)")
        self.frames_done = frames_done


# What front ends report as one line (settings.py is standard library only, vendored into the
# Blender add-on, so its SettingsError cannot derive from P2VError).
USER_ERRORS = (P2VError, SettingsError)
