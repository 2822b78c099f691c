"""Fixtures of the reliability tests: the Discord emulator, a database file in tmp_path, fake engines.

No torch here: every test runs a fake generator (these tests are about what survives, not audio).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.harness import FaultyModels


@pytest.fixture
def models() -> Iterator[FaultyModels]:
    found = FaultyModels()
    yield found
    found.unstick.set()  # a worker thread left stuck in a hang may end now
