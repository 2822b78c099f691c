"""A fast fake engine for queue tests (ordering and timing, not audio), run inside the real worker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from bot.jobs import BaseJobListener, Job, JobService, JobTrack, ServiceOptions, WorkerOptions, open_database
from bot.settings import MODEL_SIZES, Limits, Settings
from generation import (
    AudioClip,
    GenerationCancelled,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    GenerationWorker,
    ModelInfo,
    ModelLoadError,
    OutOfMemory,
    SamplingParams,
    Track,
    WorkerDied,
)

SAMPLE_RATE = 8000
OOM_PROMPT = "too big"
FAIL_PROMPT = "fails"
DIE_PROMPT = "kills the worker"
BUG_PROMPT = "hits a bug"
TERMINAL = ("finished", "failed", "cancelled")


@dataclass(frozen=True)
class Call:
    """One ``generate`` call the engine saw."""

    model: str
    requests: tuple[GenerationRequest, ...]

    @property
    def prompts(self) -> list[str]:
        return [request.prompt for request in self.requests]


@dataclass
class FakeModels:
    """The loader the worker gets; tests steer its engines and read what they did (thread-safe)."""

    steps: int = 4
    step_seconds: float = 0.0
    channels: int = 1  # 2: stereo tracks, as a stereo checkpoint makes
    calls: list[Call] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    failing_loads: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    holding_all: bool = False
    generating: threading.Event = field(default_factory=threading.Event)
    cancels_seen: list[bool] = field(default_factory=list)

    def __call__(self, source: str) -> FakeEngine:
        if source in self.failing_loads:
            raise ModelLoadError(source, f"{source} is broken")
        self.loads.append(source)
        return self._engine(source)

    def _engine(self, source: str) -> FakeEngine:
        return FakeEngine(self, source)

    def hold(self, *prompts: str) -> None:
        """Generation waits before its steps until ``release``: every call, or those with these prompts."""
        if prompts:
            self.held.update(prompts)
        else:
            self.holding_all = True

    def release(self, *prompts: str) -> None:
        if prompts:
            self.held.difference_update(prompts)
        else:
            self.holding_all = False
            self.held.clear()

    def holds(self, requests: Sequence[GenerationRequest]) -> bool:
        return self.holding_all or any(r.prompt in self.held for r in requests)

    async def wait_generating(self, within: float = 5.0) -> None:
        """Until a generate call has begun."""
        if not await asyncio.to_thread(self.generating.wait, within):
            raise TimeoutError("no generate call began")


class FakeEngine:
    """Sine tracks of exactly the asked length, after ``steps`` steps that honour ``cancel``."""

    def __init__(self, models: FakeModels, source: str) -> None:
        self._models = models
        self.info = ModelInfo(
            name=source,
            source=source,
            model_type="fake",
            device="cpu",
            dtype="float32",
            sample_rate=SAMPLE_RATE,
            frame_rate=50,
            max_seconds_per_pass=30.0,
            supports_melody="melody" in source,
            channels=models.channels,
        )

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[GenerationResult]:
        models = self._models
        models.calls.append(Call(self.info.name, tuple(requests)))
        models.generating.set()
        began = time.perf_counter()
        if any(r.prompt == OOM_PROMPT for r in requests):
            raise OutOfMemory(sum(r.variations for r in requests))
        prompts = {r.prompt for r in requests}
        if FAIL_PROMPT in prompts:
            raise GenerationError("the fake engine was told to fail")
        if DIE_PROMPT in prompts:
            raise WorkerDied("the fake device fell off")
        if BUG_PROMPT in prompts:
            raise RuntimeError("a bug in the engine")
        done = 0
        for _ in range(models.steps):
            while models.holds(requests) and not _is_set(cancel):
                time.sleep(0.002)
            if _is_set(cancel):
                break
            if models.step_seconds:
                time.sleep(models.step_seconds)
            done += 1
            if progress is not None:
                progress(done, models.steps)
        models.cancels_seen.append(_is_set(cancel))
        cancelled = done < models.steps
        if cancelled and done == 0:
            raise GenerationCancelled(0)
        share = done / models.steps
        return [self._result(r, share, cancelled, time.perf_counter() - began) for r in requests]

    def close(self) -> None:
        return None

    def _result(
        self, request: GenerationRequest, share: float, cancelled: bool, elapsed: float
    ) -> GenerationResult:
        samples = round(request.duration * SAMPLE_RATE * share)
        tracks = tuple(
            Track(np.concatenate([sine(samples, seed + c) for c in range(self._models.channels)]), seed)
            for seed in request.row_seeds
        )
        return GenerationResult(request, tracks, SAMPLE_RATE, self.info.name, elapsed, cancelled=cancelled)


def sine(samples: int, seed: int) -> np.ndarray:
    """A mono tone whose pitch depends on the seed, shaped ``(1, samples)``."""
    t = np.arange(samples, dtype=np.float32) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * (220 + seed % 440) * t)).astype(np.float32)[None, :]


def _is_set(event: threading.Event | None) -> bool:
    return event is not None and event.is_set()


class FakeClock:
    """A UTC clock the test moves by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class RecordingListener(BaseJobListener):
    """Remembers what it heard, in order; ``until`` and ``wait_settled`` wait for what it hears."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.tracks: dict[int, list[JobTrack]] = {}
        self.reasons: dict[int, str] = {}
        self.jobs: dict[int, Job] = {}
        self._heard = asyncio.Event()

    async def job_requeued(self, job: Job) -> None:
        self._record("requeued", job)

    async def job_started(self, job: Job) -> None:
        self._record("started", job)

    async def job_progress(self, job: Job, done: int, total: int) -> None:
        self._record("progress", job)

    async def job_finished(self, job: Job, tracks: Sequence[JobTrack]) -> None:
        self.tracks[job.id] = list(tracks)
        self._record("finished", job)

    async def job_failed(self, job: Job, reason: str) -> None:
        self.reasons[job.id] = reason
        self._record("failed", job)

    async def job_cancelled(self, job: Job) -> None:
        self._record("cancelled", job)

    def outcome(self, job_id: int) -> str | None:
        return next((kind for kind, jid in reversed(self.events) if jid == job_id and kind in TERMINAL), None)

    def of(self, job_id: int) -> list[str]:
        return [kind for kind, jid in self.events if jid == job_id]

    async def until(self, condition: Callable[[], bool], within: float = 10.0) -> None:
        """Wait until ``condition`` holds, checking each time something is heard."""
        async with asyncio.timeout(within):
            while not condition():
                self._heard.clear()
                await self._heard.wait()

    async def heard(self, kind: str, job_id: int, within: float = 10.0) -> None:
        await self.until(lambda: kind in self.of(job_id), within)

    async def wait_settled(self, job_ids: Iterable[int], within: float = 10.0) -> None:
        wanted = set(job_ids)
        await self.until(lambda: all(self.outcome(job_id) is not None for job_id in wanted), within)

    def _record(self, kind: str, job: Job) -> None:
        self.events.append((kind, job.id))
        self.jobs[job.id] = job
        self._heard.set()


def make_settings(
    db_path: Path | str,
    *,
    max_queued: int = 10,
    daily_seconds: int = 10_000,
    max_duration: int = 120,
    queue_size: int = 100,
    max_batch: int = 4,
    model: str = "small",
) -> Settings:
    postgres = str(db_path).startswith("postgresql://")
    return Settings(
        db_path=Path("unused.sqlite3") if postgres else Path(db_path),
        db_url=str(db_path) if postgres else None,
        model=model,
        model_sources={size: f"fake-{size}" for size in MODEL_SIZES},
        limits=Limits(max_queued=max_queued, daily_seconds=daily_seconds, max_duration=max_duration),
        queue_size=queue_size,
        max_batch=max_batch,
    )


@asynccontextmanager
async def running_service(
    settings: Settings,
    models: FakeModels,
    *,
    listener: BaseJobListener | None = None,
    clock: Callable[[], datetime] | None = None,
    max_attempts: int = 2,
) -> AsyncIterator[JobService]:
    """A started service on ``settings.db_path`` with fake engines in real workers."""
    async with open_database(settings.database) as db:
        service = JobService(
            db,
            settings,
            lambda: GenerationWorker(models),
            listener=listener,
            max_attempts=max_attempts,
            # Short leases, as a test waits for takeovers (PostgreSQL is shared: nothing is taken at once),
            # but not so short that a busy two-core machine lets a live worker's lease run out.
            options=ServiceOptions(poll=0.1, bot_lease=3.0),
            worker_options=WorkerOptions(lease=3.0, poll=0.1),
            **({"clock": clock} if clock is not None else {}),
        )
        async with service:
            yield service


def request(
    prompt: str = "calm piano",
    *,
    duration: float = 2.0,
    variations: int = 1,
    seed: int | None = None,
    loop: bool = False,
    sampling: SamplingParams | None = None,
    melody: AudioClip | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt,
        duration=duration,
        variations=variations,
        seed=seed,
        loop=loop,
        sampling=sampling or SamplingParams(),
        melody=melody,
    )
