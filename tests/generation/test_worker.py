"""The worker thread: calls run off the event loop, in order; its death fails callers instead of hanging."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from generation import (
    GenerationRequest,
    GenerationResult,
    GenerationWorker,
    ModelInfo,
    ModelLoadError,
    WorkerDied,
)


class _Engine:
    def __init__(self, name: str, fail: BaseException | None = None) -> None:
        self.info = ModelInfo(name, name, "musicgen", "cpu", "float32", 32000, 50, 30.0, False)
        self.fail = fail
        self.threads: list[str] = []
        self.closed = False

    def generate(
        self, requests: Sequence[GenerationRequest], progress=None, cancel=None
    ) -> list[GenerationResult]:
        self.threads.append(threading.current_thread().name)
        if self.fail is not None:
            raise self.fail
        if progress is not None:
            progress(1, 1)
        return []

    def close(self) -> None:
        self.closed = True


async def test_generation_runs_in_the_worker_thread_and_progress_on_the_loop() -> None:
    engine = _Engine("a")
    worker = GenerationWorker(lambda key: engine)
    await worker.start("a")
    seen: list[str] = []
    await worker.generate(
        [GenerationRequest("x")], progress=lambda d, t: seen.append(threading.current_thread().name)
    )
    assert engine.threads == ["generation-worker"]
    assert seen == [threading.current_thread().name]
    await worker.close()
    assert engine.closed


async def test_failed_switch_keeps_the_old_model() -> None:
    engines = {"a": _Engine("a")}

    def load(key: str) -> _Engine:
        if key not in engines:
            raise ModelLoadError(key, f"no model {key}")
        return engines[key]

    worker = GenerationWorker(load)
    await worker.start("a")
    with pytest.raises(ModelLoadError, match="no model b"):
        await worker.switch_model("b")
    assert worker.info is not None and worker.info.name == "a"
    await worker.close()


async def test_a_dying_worker_fails_its_callers_with_a_clear_error() -> None:
    worker = GenerationWorker(lambda key: _Engine(key, fail=SystemExit(3)))
    await worker.start("a")
    with pytest.raises(WorkerDied, match="SystemExit"):
        await worker.generate([GenerationRequest("x")])
    assert not worker.alive
    with pytest.raises(WorkerDied):
        await worker.generate([GenerationRequest("x")])


async def test_an_abandoned_worker_fails_what_waits_and_releases_its_model_when_unstuck() -> None:
    unstick = threading.Event()
    engine = _Engine("a")
    engine.generate = lambda requests, progress=None, cancel=None: unstick.wait() and []  # type: ignore[method-assign]
    worker = GenerationWorker(lambda key: engine)
    await worker.start("a")
    stuck = asyncio.ensure_future(worker.generate([GenerationRequest("x")]))
    queued = asyncio.ensure_future(worker.generate([GenerationRequest("y")]))
    await asyncio.sleep(0.05)

    worker.abandon("it was stuck")
    with pytest.raises(WorkerDied, match="it was stuck"):
        await queued
    with pytest.raises(WorkerDied):
        await worker.generate([GenerationRequest("z")])
    await asyncio.wait_for(worker.close(), 1)  # does not wait for the stuck thread
    assert not worker.alive and not engine.closed

    unstick.set()
    await stuck
    await asyncio.to_thread(worker._thread.join, 5)
    assert engine.closed and not worker._thread.is_alive()
