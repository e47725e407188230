"""What a client may name on the runtime's machine: model folders, the inversion cache, hub ids.

A job's ``model``, ``captioner`` and ``cache_dir`` are paths (or hub ids) on the server's machine,
chosen by whoever holds the token. :class:`PathRules` decides, before a job is accepted, which of
them the server will use:

- ``models_dirs``: a model or captioner folder must resolve (``realpath``: ``..`` and symlinks
  followed) inside one of them. ``None`` allows any folder the server's user can read: the
  default on loopback and the Unix socket, where the token holder is that user (the add-on's own
  runtime loads the folders of its preferences). A server open to other machines allows none
  unless ``--models-dir`` names some.
- ``cache_root``: ``cache_dir`` must resolve inside it (an unset ``cache_dir`` means
  ``cache_root/inversions``). ``None`` (loopback default) allows any folder; a server open to
  other machines defaults to the user cache folder (where the default inversion cache lives).
- ``allow_downloads``: a hub id missing from the Hugging Face cache is fetched only when this is
  on (loopback default: on, the first run's download; a remote-facing server: off).

A refusal is a ``settings`` error naming the setting. Paths that pass are handed to the job as
their real paths, so what was checked is what is opened.
"""

from __future__ import annotations

import dataclasses
import os

from .. import hub
from ..settings import EditSettings, SettingsError, describe


def default_cache_root() -> str:
    """The user cache folder of ``p2v`` (``~/.cache/p2v`` on Linux); the inversion cache is its ``inversions``."""
    import platformdirs

    return os.path.realpath(platformdirs.user_cache_dir("p2v", appauthor=False))


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False


@dataclasses.dataclass(frozen=True)
class PathRules:
    """The server's rules for client-named paths (see the module docstring)."""

    models_dirs: tuple[str, ...] | None = None
    cache_root: str | None = None
    allow_downloads: bool = True

    @classmethod
    def for_server(
        cls,
        *,
        remote: bool,
        models_dirs: list[str] | tuple[str, ...] = (),
        cache_root: str | None = None,
        allow_downloads: bool | None = None,
    ) -> PathRules:
        """The rules of a server from its options; ``remote``: it listens on a non-loopback address."""
        dirs = tuple(_real(d) for d in models_dirs) if models_dirs else (() if remote else None)
        root = _real(cache_root) if cache_root else (default_cache_root() if remote else None)
        downloads = (not remote) if allow_downloads is None else bool(allow_downloads)
        return cls(dirs, root, downloads)

    def describe(self) -> str:
        """One log line: what clients may name."""
        folders = "any folder" if self.models_dirs is None else (", ".join(self.models_dirs) or "no folder")
        cache = self.cache_root or "any folder"
        downloads = "on" if self.allow_downloads else "off"
        return f"model folders: {folders}; inversion cache under: {cache}; hub downloads: {downloads}"

    def apply(self, settings: EditSettings) -> EditSettings:
        """``settings`` with checked real paths; :class:`SettingsError` naming the setting otherwise."""
        names = ("model",) if settings.source_prompt else ("model", "captioner")  # no caption, no captioner
        changes = {name: self._model(name, getattr(settings, name), settings.dtype) for name in names}
        if self.cache_root is not None or settings.cache_dir is not None:
            changes["cache_dir"] = self._cache_dir(settings.cache_dir)
        return dataclasses.replace(settings, **changes)

    def _model(self, name: str, value: str, dtype: str) -> str:
        text = value.strip()
        expanded = os.path.expanduser(text)
        if not os.path.exists(expanded) and hub.looks_like_hub_id(text):
            if not self.allow_downloads and not _in_hub_cache(text, name, dtype):
                raise SettingsError(
                    f"{describe(name)} `{text}` is not in the runtime's Hugging Face cache, and this runtime does "
                    f"not download models: run `p2v models fetch` on its machine, or start it with --allow-downloads"
                )
            return value
        if self.models_dirs is None:
            return value  # the loader says what is wrong with a missing folder
        if not self.models_dirs:
            raise SettingsError(
                f"{describe(name)} names a folder, and this runtime loads no folder a client names (it was "
                "started without --models-dir): give a hub id it has"
            )
        real = _real(text)
        if not any(_inside(real, root) for root in self.models_dirs):
            raise SettingsError(
                f"{describe(name)} must be a folder inside the runtime's model folders "
                f"({', '.join(self.models_dirs)}); {text!r} is not"
            )
        return real

    def _cache_dir(self, value: str | None) -> str:
        if value is None:
            return os.path.join(self.cache_root, "inversions")
        real = _real(value)
        if self.cache_root is not None and not _inside(real, self.cache_root):
            raise SettingsError(
                f"{describe('cache_dir')} must be a folder inside the runtime's cache root {self.cache_root}; "
                f"{value!r} is not (leave it empty for the default)"
            )
        return real


def _in_hub_cache(repo_id: str, setting: str, dtype: str) -> bool:
    """Whether the Hugging Face cache holds every file one precision of ``repo_id`` needs."""
    snapshot = hub.cached_snapshot(repo_id, hub.hub_cache_dir())
    if snapshot is None:
        return False
    precisions = ("fp32",) if setting == "captioner" else (("fp16", "fp32") if dtype == "auto" else (dtype,))
    return any(hub.local_status(snapshot, precision).complete for precision in precisions)
