"""Fixtures of the job service tests: a database file in tmp_path, fake engines, a hand-moved clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.jobs.fakes import FakeClock, FakeModels, RecordingListener


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "musicbot.sqlite3"


@pytest.fixture
def models() -> FakeModels:
    return FakeModels()


@pytest.fixture
def listener() -> RecordingListener:
    return RecordingListener()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
