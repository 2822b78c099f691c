"""Per-user cache directories: ``$XDG_CACHE_HOME/musicbot/<name>`` (by default under ``~/.cache``), created
0700 and refused, with a message, where they or what they hold could have been written by someone else.

What is loaded from them (a compiled library, prepared weights) is trusted as this user's own work, so
every reader checks the directory and the file first (``check_private``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafeCache(OSError):
    """A cache directory or file that another user could have written: not used."""


def cache_root() -> Path:
    """``$XDG_CACHE_HOME`` where set to an absolute path (the XDG base directory rule), else ``~/.cache``."""
    configured = os.environ.get("XDG_CACHE_HOME", "")
    return Path(configured) if os.path.isabs(configured) else Path.home() / ".cache"


def private_dir(name: str, root: Path | None = None) -> Path:
    """``musicbot/<name>`` under ``root`` (default: the cache root), created 0700: raises UnsafeCache where
    it, or the ``musicbot`` directory holding it, is not this user's own or is writable by group or
    others."""
    base = root or cache_root()
    base.mkdir(parents=True, exist_ok=True)
    directory = base
    for part in ("musicbot", name):
        directory = directory / part
        directory.mkdir(mode=0o700, exist_ok=True)
        check_private(directory, "directory")
    return directory


def check_private(path: Path, what: str) -> None:
    """Raises UnsafeCache unless ``path`` is owned by this user and not writable by group or others
    (``what`` is ``directory`` for a directory, anything else names a regular file)."""
    info = path.stat()
    kind_ok = stat.S_ISDIR(info.st_mode) if what == "directory" else stat.S_ISREG(info.st_mode)
    if not kind_ok:
        raise UnsafeCache(f"{path} is not a {what}")
    if info.st_uid != os.getuid():
        raise UnsafeCache(f"{what} {path} belongs to uid {info.st_uid}, not to this user ({os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCache(
            f"{what} {path} is writable by its group or others (mode {stat.S_IMODE(info.st_mode):o})"
        )
