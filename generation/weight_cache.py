"""Prepared decoder weights kept between runs, keyed by the checkpoint, so that a restart, a ``/model``
switch or a second ``musicbot generate`` skips the quantization of every matrix.

The cache lives in ``$XDG_CACHE_HOME/musicbot/weights`` (see ``generation.private_cache``): one
safetensors file per checkpoint and preparation, written atomically, 0600. A file that does not hold what
its name promises (another format, a missing matrix, a wrong shape, a truncated write) is ignored and
made again; a directory or file another user could have written is refused and nothing is cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from generation.private_cache import UnsafeCache, check_private, private_dir

log = logging.getLogger(__name__)

# The cache root the files go under (``musicbot/weights``); None: ``$XDG_CACHE_HOME``. A test suite points
# it elsewhere so that it neither fills nor empties its user's cache.
root: Path | None = None
KEEP = 3  # files kept: the models one owner switches between; each is about a quarter of its fp32 size
Tensors = dict[str, torch.Tensor]
_writers: list[threading.Thread] = []
Shapes = Mapping[str, Mapping[str, tuple[tuple[int, ...], torch.dtype]]]


def cached(
    key: str | None,
    shapes: Shapes,
    make: Callable[[str], Tensors],
) -> dict[str, Tensors]:
    """``{name: make(name)}`` for every matrix name in ``shapes``, read from the cache when the file for
    ``key`` holds exactly the expected tensors (``shapes[name][part] = (size, dtype)``), else made and
    stored. ``key=None`` (a checkpoint whose files cannot be identified) makes everything, stores nothing."""
    if key is not None:
        found = read(key)
        if found is not None and matches(found, shapes):
            return found
    made = {name: make(name) for name in shapes}
    if key is not None:
        store(key, made)
    return made


def read(key: str) -> dict[str, Tensors] | None:
    """What the cache file for ``key`` holds, ``{name: {part: tensor}}``; None where there is none, or it
    is unreadable, unsafe or another key's."""
    path = _path(key)
    return None if path is None else _read(path, key)


def matches(found: Mapping[str, Tensors], shapes: Shapes) -> bool:
    """Whether ``found`` holds exactly the tensors ``shapes`` expects (logged when it does not)."""
    same = set(found) == set(shapes) and all(
        set(found[name]) == set(parts)
        and all(
            tuple(found[name][part].shape) == tuple(size) and found[name][part].dtype == dtype
            for part, (size, dtype) in parts.items()
        )
        for name, parts in shapes.items()
    )
    if not same:
        log.warning("prepared weights in the cache do not match the model: made again")
    return same


def store(key: str, made: Mapping[str, Tensors]) -> None:
    """Write ``made`` as the cache file for ``key``, in the background; the process waits for it at exit."""
    path = _path(key)
    if path is not None:
        writer = threading.Thread(target=_write, args=(path, key, made), name="weight-cache-write")
        _writers.append(writer)
        writer.start()


def flush() -> None:
    """Wait until every cache file started so far is written."""
    while _writers:
        _writers.pop().join()


def _path(key: str) -> Path | None:
    try:
        directory = private_dir("weights", root)
    except UnsafeCache as exc:
        log.warning("prepared weights not cached: %s", exc)
        return None
    except OSError as exc:  # no home directory, a read-only file system
        log.info("prepared weights not cached: %s", exc)
        return None
    return directory / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def _read(path: Path, key: str) -> dict[str, Tensors] | None:
    try:
        check_private(path, "file")
        with safe_open(path, framework="pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None  # two keys with one hash: never trusted
            found: dict[str, Tensors] = {}
            for stored in handle.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                name, _, part = stored.rpartition("/")
                found.setdefault(name, {})[part] = handle.get_tensor(stored)
    except FileNotFoundError:
        return None
    except UnsafeCache as exc:
        log.warning("prepared weights not read: %s", exc)
        return None
    except (OSError, SafetensorError) as exc:
        log.warning("prepared weights in %s unreadable (%s): made again", path, exc)
        return None
    os.utime(path)  # recently used: kept longest
    log.info("prepared weights read from %s", path)
    return found


def _write(path: Path, key: str, made: Mapping[str, Tensors]) -> None:
    flat = {f"{name}/{part}": t.contiguous() for name, parts in made.items() for part, t in parts.items()}
    handle, partial = tempfile.mkstemp(prefix=".partial-", dir=path.parent)
    os.close(handle)
    try:
        save_file(flat, partial, metadata={"key": key})
        os.chmod(partial, 0o600)
        os.replace(partial, path)
    except OSError as exc:
        log.warning("prepared weights not cached: %s", exc)
        Path(partial).unlink(missing_ok=True)
        return
    log.info("prepared weights cached in %s", path)
    _evict(path.parent)


def _evict(directory: Path) -> None:
    """Keep the KEEP most recently used files."""
    files = sorted(directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in files[KEEP:]:
        old.unlink(missing_ok=True)
