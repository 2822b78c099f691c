"""Making a path another user's, for the tests of caches that must refuse it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def give_to_another_user(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root gives ``path`` away for real; anyone else sees it from another user's side (a different uid)."""
    other = os.getuid() + 1000
    if os.getuid() == 0:
        os.chown(path, other, -1)
    else:
        monkeypatch.setattr(os, "getuid", lambda: other)
