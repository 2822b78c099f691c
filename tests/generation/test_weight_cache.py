"""Prepared int8 weights kept between runs: the same music from the cache as without it, a new file when
the checkpoint changes, and nothing trusted that is damaged or that another user could have written."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from generation import GenerationRequest, weight_cache
from generation.engine import load_engine
from generation.loader import int8_supported
from generation.private_cache import private_dir
from generation.random_models import save_model, tiny_architecture
from tests.generation.ownership import give_to_another_user

pytestmark = pytest.mark.skipif(not int8_supported(), reason="fbgemm is needed for int8 steps")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache root for this test; returns where the weights go."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(weight_cache, "root", None)  # the real place, under $XDG_CACHE_HOME
    return tmp_path / "cache" / "musicbot" / "weights"


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A copy of the tiny checkpoint that a test may change."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _music(directory: Path) -> torch.Tensor:
    engine = load_engine(str(directory), device="cpu", dtype="int8")
    weight_cache.flush()
    [result] = engine.generate([GenerationRequest("rainy piano", duration=1.0, seed=7)])
    return torch.from_numpy(result.tracks[0].audio.copy())


def test_cached_int8_weights_make_the_same_music_and_are_read_instead_of_made(
    cache: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="generation.weight_cache")
    first = _music(checkpoint)
    [stored] = list(cache.iterdir())
    assert stored.stat().st_mode & 0o777 == 0o600
    assert cache.stat().st_mode & 0o777 == 0o700 and cache.parent.stat().st_mode & 0o777 == 0o700
    assert "prepared weights cached in" in caplog.text
    caplog.clear()
    again = _music(checkpoint)
    # read once, while the model loaded, and packed then: not read again when the steps are built
    assert caplog.text.count(f"prepared weights read from {stored}") == 1
    assert torch.equal(first, again)  # bit for bit: the cache holds exactly what quantizing makes
    assert list(cache.iterdir()) == [stored]


def test_a_changed_checkpoint_is_prepared_again(cache: Path, checkpoint: Path) -> None:
    _music(checkpoint)
    [before] = list(cache.iterdir())
    save_model(tiny_architecture(), checkpoint, seed=1)  # new weights in the same directory
    _music(checkpoint)
    assert len(list(cache.iterdir())) == 2 and before.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "another model's"])
def test_a_damaged_cache_file_is_made_again_with_the_same_music(
    cache: Path, checkpoint: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="generation.weight_cache")
    first = _music(checkpoint)
    [stored] = list(cache.iterdir())
    if damage == "truncated":
        stored.write_bytes(stored.read_bytes()[:1000])
    elif damage == "garbage":
        stored.write_bytes(b"\0" * 4096)
    else:  # a valid file with the right key but other shapes: another architecture's weights
        weight_cache._write(stored, _stored_key(stored), {"lm_head": {"ints": torch.zeros(2, 2)}})
    caplog.clear()
    assert torch.equal(_music(checkpoint), first)
    assert "made again" in caplog.text
    assert "prepared weights cached in" in caplog.text  # and stored properly this time


def _stored_key(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return handle.metadata()["key"]


def test_a_cache_file_others_can_write_is_not_read(
    cache: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = _music(checkpoint)
    [stored] = list(cache.iterdir())
    stored.chmod(0o666)
    caplog.clear()
    assert torch.equal(_music(checkpoint), first)
    assert f"file {stored} is writable by its group or others (mode 666)" in caplog.text
    assert stored.stat().st_mode & 0o777 == 0o600  # replaced by a private one


def test_a_cache_directory_of_another_user_is_not_used(
    cache: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache.mkdir(parents=True, mode=0o700)
    give_to_another_user(cache, monkeypatch)
    _music(checkpoint)
    assert "prepared weights not cached" in caplog.text and "belongs to uid" in caplog.text
    assert not list(cache.iterdir())


def test_the_cache_keeps_the_most_recently_used_files(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = {"m": {"ints": ((2, 2), torch.float32)}}
    made: list[str] = []

    def make(key: str) -> dict[str, dict[str, torch.Tensor]]:
        def one(name: str) -> dict[str, torch.Tensor]:
            made.append(key)
            return {"ints": torch.zeros(2, 2)}

        found = weight_cache.cached(key, shapes, one)
        weight_cache.flush()
        return found

    for key in ("a", "b", "c"):
        make(key)
    for path, stamp in zip(
        sorted(cache.iterdir(), key=lambda p: p.stat().st_mtime_ns), (1, 2, 3), strict=True
    ):
        os.utime(path, ns=(stamp * 10**9, stamp * 10**9))  # a, b, c in that order, whatever the clock
    make("a")  # read: now the most recent
    make("d")  # a fourth: the least recently used (b) goes
    assert made == ["a", "b", "c", "d"]
    assert len(list(cache.iterdir())) == weight_cache.KEEP
    made.clear()
    make("b")
    assert made == ["b"]  # b was evicted; a, c and d were kept
    make("a")
    assert made == ["b"]


def test_without_a_fingerprint_nothing_is_cached(cache: Path) -> None:
    found = weight_cache.cached(None, {"m": {"x": ((1,), torch.float32)}}, lambda _: {"x": torch.ones(1)})
    weight_cache.flush()
    assert torch.equal(found["m"]["x"], torch.ones(1))
    assert not cache.exists() or not list(cache.iterdir())


def test_the_engine_is_ready_when_loaded(cache: Path, checkpoint: Path) -> None:
    engine = load_engine(str(checkpoint), device="cpu", dtype="int8")
    weight_cache.flush()
    assert engine._weights is not None and engine._decoder is not None  # nothing left for the first request
    assert set(engine.timings) == {"imports", "load", "prepare"}
    assert private_dir("weights") == cache
