"""Fixtures of the bot tests: the Discord emulator, a database file in tmp_path, fake engines."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.jobs.fakes import FakeModels


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model runs 0.05 s a second of audio on one thread, but can take 18 s on two when another
    process keeps a core busy (OpenMP threads spin on each other); these tests run it on one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def models() -> FakeModels:
    return FakeModels()
