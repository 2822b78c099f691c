"""Fixtures of the reliability tests: the Discord emulator, a database file in tmp_path, fake engines.

No torch here: every test runs a fake generator (these tests are about what survives, not audio).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.discord_emulator import DiscordEmulator
from tests.reliability.harness import FaultyModels


@pytest.fixture
async def emu() -> AsyncIterator[DiscordEmulator]:
    async with DiscordEmulator(max_lifetime=90) as emulator:
        yield emulator


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "musicbot.sqlite3"


@pytest.fixture
def models() -> Iterator[FaultyModels]:
    found = FaultyModels()
    yield found
    found.unstick.set()  # a worker thread left stuck in a hang may end now
