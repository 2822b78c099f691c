"""Shared fixtures: tiny random MusicGen checkpoints saved to disk and loaded by the production loader."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.discord_emulator import DiscordEmulator

# No test may reach the Hugging Face hub (nor anything but loopback).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
logging.getLogger("transformers").setLevel(logging.ERROR)


SLOW_PLACES = (
    "tests/reliability/",
    "tests/fleet/",
    "tests/generation/",
    "tests/test_cli.py",
    "tests/bot/test_run.py",
)
NATIVE_PLACES = ("tests/generation/test_native.py",)
POSTGRES_PLACES = ("tests/fleet/", "tests/jobs/test_transfer.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers by where a test lives and what it uses (pyproject lists them)."""
    root = Path(str(config.rootpath))
    for item in items:
        place = Path(str(item.path)).relative_to(root).as_posix()
        slow = place.startswith(SLOW_PLACES)
        item.add_marker(pytest.mark.slow if slow else pytest.mark.unit)
        if place.startswith(NATIVE_PLACES):
            item.add_marker(pytest.mark.native)
        if place.startswith("tests/reliability/"):
            item.add_marker(pytest.mark.reliability)
        if place.startswith("tests/fleet/"):
            item.add_marker(pytest.mark.fleet)
        callspec = getattr(item, "callspec", None)
        if place.startswith(POSTGRES_PLACES) or (
            callspec is not None and callspec.params.get("database") == "postgresql"
        ):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session", autouse=True)
def _weight_cache_of_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Prepared weights of the tests' models go to a directory of the session, not the user's cache."""
    from generation import weight_cache

    weight_cache.root = tmp_path_factory.mktemp("cache")
    yield
    weight_cache.flush()
    weight_cache.root = None


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MusicGen (real 32 kHz EnCodec geometry), saved like a hub checkpoint."""
    from generation.random_models import save_model, tiny_architecture

    return save_model(tiny_architecture(), tmp_path_factory.mktemp("models") / "tiny-musicgen")


@pytest.fixture(scope="session")
def tiny_melody_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MusicGen-Melody, saved like a hub checkpoint."""
    from generation.random_models import save_model, tiny_architecture

    return save_model(tiny_architecture(melody=True), tmp_path_factory.mktemp("models") / "tiny-melody")


@pytest.fixture(scope="session")
def tiny_stereo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random stereo MusicGen: 8 codebooks, left and right interleaved, saved like a hub checkpoint."""
    from generation.random_models import save_model, tiny_architecture

    return save_model(tiny_architecture(stereo=True), tmp_path_factory.mktemp("models") / "tiny-stereo")


@pytest.fixture(scope="session")
def tiny_stereo_engine(tiny_stereo_dir: Path):
    """The tiny stereo model loaded through ``load_engine`` in fp32 on the CPU."""
    from generation.engine import load_engine

    return load_engine(str(tiny_stereo_dir), name="tiny-stereo", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):
    """The tiny model loaded through ``load_engine`` in fp32 on the CPU (shared: engines are stateless)."""
    from generation.engine import load_engine

    return load_engine(str(tiny_model_dir), name="tiny", device="cpu", dtype="float32")


@pytest.fixture
async def emu() -> AsyncIterator[DiscordEmulator]:
    """A local Discord API on 127.0.0.1 that the real discord.py client talks to."""
    from tests.discord_emulator import DiscordEmulator

    async with DiscordEmulator(max_lifetime=90) as emulator:
        yield emulator


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "musicbot.sqlite3"


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """``MUSICBOT_DB`` for one test, once per backend: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "musicbot.sqlite3")
        return
    from tests.databases import fresh_postgres

    async with fresh_postgres() as url:
        yield url
