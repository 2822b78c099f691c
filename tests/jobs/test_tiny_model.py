"""The service on the tiny random MusicGen, through the real loader and worker: timing and lengths."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from bot.jobs import JobKind, JobService, Origin, TrackRef, open_database
from bot.settings import Limits, Settings
from generation import Engine, GenerationRequest, GenerationResult, GenerationWorker
from tests.jobs.fakes import RecordingListener, request

TIMEOUT = 120.0


class CountingEngine:
    """The real engine, noting how many requests each generate call got."""

    def __init__(self, inner: Engine, batches: list[int]) -> None:
        self._inner = inner
        self._batches = batches
        self.info = inner.info

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: object = None,
        cancel: threading.Event | None = None,
    ) -> list[GenerationResult]:
        self._batches.append(len(requests))
        return self._inner.generate(requests, progress, cancel)  # type: ignore[arg-type]

    def close(self) -> None:
        self._inner.close()


@asynccontextmanager
async def tiny_service(
    db_path: Path, model_dir: Path, listener: RecordingListener, batches: list[int]
) -> AsyncIterator[JobService]:
    from generation.engine import load_engine

    def load(source: str) -> Engine:
        return CountingEngine(load_engine(source, name="tiny", device="cpu", dtype="float32"), batches)

    settings = Settings(
        db_path=db_path,
        model="small",
        model_sources={"small": str(model_dir)},
        limits=Limits(max_queued=10, daily_seconds=10_000, max_duration=60),
        max_batch=4,
    )
    async with (
        open_database(db_path) as db,
        JobService(db, settings, lambda: GenerationWorker(load), listener=listener) as service,
    ):
        yield service


async def test_the_event_loop_never_stalls_while_the_tiny_model_generates(
    db_path: Path, tiny_model_dir: Path
) -> None:
    listener = RecordingListener()
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with tiny_service(db_path, tiny_model_dir, listener, []) as service:
        ticking = asyncio.create_task(ticker())
        job = await service.submit(request("slow ambient pads", duration=4, variations=2), Origin(1))
        await listener.wait_settled([job.id], within=TIMEOUT)
        done.set()
        await ticking

    assert listener.outcome(job.id) == "finished"
    assert len(gaps) > 50
    p99 = statistics.quantiles(gaps, n=100)[98]
    assert p99 < 0.050, f"p99 loop gap {p99 * 1000:.1f} ms, worst {max(gaps) * 1000:.1f} ms"


async def test_compatible_jobs_share_one_batch_and_last_exactly_what_was_asked(
    db_path: Path, tiny_model_dir: Path
) -> None:
    listener = RecordingListener()
    batches: list[int] = []
    async with tiny_service(db_path, tiny_model_dir, listener, batches) as service:
        blocker = await service.submit(request("warm up", duration=3), Origin(9))
        jobs = [await service.submit(request(f"lofi beat {u}", duration=1.5), Origin(u)) for u in range(3)]
        await listener.wait_settled([blocker.id, *(j.id for j in jobs)], within=TIMEOUT)
        info = service.model_info

    assert info is not None
    assert batches == [1, 3]
    for job in jobs:
        [track] = listener.tracks[job.id]
        assert track.audio.sample_rate == info.sample_rate
        assert track.audio.samples.shape[-1] == round(1.5 * info.sample_rate)
        assert track.seed == job.request.seed


async def test_an_extension_on_the_tiny_model_continues_the_stored_track(
    db_path: Path, tiny_model_dir: Path
) -> None:
    listener = RecordingListener()
    async with tiny_service(db_path, tiny_model_dir, listener, []) as service:
        parent = await service.submit(request("folk guitar", duration=1.5), Origin(1))
        await listener.wait_settled([parent.id], within=TIMEOUT)
        extension = await service.submit(
            request("folk guitar", duration=1.0), Origin(1), kind=JobKind.EXTEND, parent=TrackRef(parent.id)
        )
        await listener.wait_settled([extension.id], within=TIMEOUT)

    assert listener.outcome(extension.id) == "finished", listener.reasons.get(extension.id)
    # The engine gives back the whole track: the stored 1.5 s and the 1 s that continue it.
    assert listener.tracks[extension.id][0].seconds == pytest.approx(2.5, abs=0.001)
