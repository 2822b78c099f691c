"""The worker side of the job service: claim a fair batch for the loaded model, run it, settle it.

A ``JobWorker`` owns one ``GenerationWorker`` (one model, one device) and talks to the others only
through the store: ``musicbot worker`` runs one in a process of its own, any number of them on one
PostgreSQL database; ``musicbot run`` supervises one beside itself (``bot.supervisor``).

- Claims hold a lease the worker renews while it lives; a worker that dies or hangs loses its
  jobs to the others when the lease runs out (``JobStore.reap``), and its late writes are refused.
- Cancellation reaches the worker through the rows: a job that is no longer running under this
  worker's claim is cancelled here; the batch stops when all of it is.
- ``/model`` asks for a model through the ``model.wanted`` setting: the worker finishes its batch,
  loads it, and makes it the model served (or withdraws the wish, saying why).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from bot.jobs.db import JobsDatabase, wait_changed
from bot.jobs.errors import BotError
from bot.jobs.flac import from_flac, to_flac
from bot.jobs.models import Clock, Job, JobKind, JobResult, JobTrack, utc_now
from bot.jobs.store import (
    MODEL_SETTING,
    SPEED_SETTING,
    WANTED_MODEL_SETTING,
    JobStore,
    StoredTrack,
    WorkerRow,
)
from bot.settings import Settings
from generation import (
    AudioClip,
    GenerationCancelled,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    GenerationWorker,
    ModelInfo,
    OutOfMemory,
    WorkerDied,
)

log = logging.getLogger(__name__)

WorkerFactory = Callable[[], GenerationWorker]

# Weight of the newest batch in the running estimate of compute seconds per audio second.
SPEED_WEIGHT = 0.3
INTERNAL_ERROR = "something went wrong inside the bot while making this; please try again"
ENGINE_FAILED = "something went wrong in the music generator; it was restarted, please try again"
# Once the speed is measured, a batch may also take this many times its expected time.
SLOWDOWN_ALLOWED = 10.0


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker keeps time.

    ``lease``: seconds a claim holds without a heartbeat (a third of it between heartbeats);
    ``poll``: the longest wait between looks at the queue when nothing wakes the worker;
    ``cancel_grace``: seconds a batch past its time limit gets to stop before its engine is abandoned;
    ``close_timeout``: the same when the worker stops; ``progress_interval``: between progress writes.
    """

    lease: float = 30.0
    poll: float = 1.0
    max_attempts: int = 2
    cancel_grace: float = 10.0
    close_timeout: float = 10.0
    progress_interval: float = 0.5


@dataclass(eq=False)
class _Batch:
    """The batch on the engine now; ``cancelled`` holds jobs that stopped being this worker's."""

    picked: list[Job]
    cancel: threading.Event = field(default_factory=threading.Event)
    cancelled: set[int] = field(default_factory=set)
    settled: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    shutdown: bool = False
    timed_out: bool = False
    requeued: set[int] = field(default_factory=set)
    call: asyncio.Task[list[GenerationResult]] | None = None
    progress: tuple[int, int] | None = None
    progress_task: asyncio.Task[None] | None = None

    @property
    def ids(self) -> set[int]:
        return {job.id for job in self.picked}

    def unsettled(self) -> list[Job]:
        return [job for job in self.picked if job.id not in self.settled]


class JobWorker:
    """Serves the shared queue with one engine until closed."""

    def __init__(
        self,
        db: JobsDatabase,
        settings: Settings,
        worker_factory: WorkerFactory,
        *,
        worker_id: str | None = None,
        device: str | None = None,
        clock: Clock = utc_now,
        options: WorkerOptions | None = None,
        on_stuck: Callable[[], None] | None = None,
        on_generated: Callable[[float], None] | None = None,
    ) -> None:
        self.id = worker_id or new_id("worker")
        self._db = db
        self._store = JobStore(db, settings.limits, settings.queue_size)
        self._settings = settings
        self._factory = worker_factory
        self._device = device or settings.device
        self._clock = clock
        self._options = options or WorkerOptions()
        self._on_stuck = on_stuck
        self._on_generated = on_generated
        self._engine: GenerationWorker | None = None
        self._model: str | None = None
        self._speed: float | None = None
        self._batch: _Batch | None = None
        self._changes = db.subscribe()
        self._closing = False
        self._loop_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._last_renew = 0.0

    @property
    def model(self) -> str | None:
        return self._model

    @property
    def info(self) -> ModelInfo | None:
        return self._engine.info if self._engine is not None else None

    @property
    def engine(self) -> GenerationWorker | None:
        """The generation worker that owns the model now (replaced when its state is in doubt)."""
        return self._engine

    # --- life cycle ---

    async def start(self) -> ModelInfo:
        """Register, load the model being served (or the wanted one), and start taking jobs.

        A model that does not load stops the start with ``ModelLoadError`` (after trying the size
        from the settings, when the stored choice was another).
        """
        now = wall_clock()
        await self._store.register_worker(
            WorkerRow(self.id, socket.gethostname(), os.getpid(), self._device, now, now)
        )
        wanted = await self._store.setting(WANTED_MODEL_SETTING)
        serving = await self._store.setting(MODEL_SETTING)
        self._engine = self._factory()
        try:
            info = await self._load_first(wanted or serving or self._settings.model)
        except BaseException as exc:
            await self._store.update_worker(self.id, stopped_at=wall_clock(), last_error=str(exc))
            await self._engine.close()
            raise
        await self._reap()
        self._loop_task = asyncio.create_task(self._serve_forever(), name=f"{self.id}-serve")
        self._watch_task = asyncio.create_task(self._watch_forever(), name=f"{self.id}-watch")
        log.info("worker %s serves %s (%s, %s)", self.id, self._model, info.device, info.dtype)
        return info

    async def close(self) -> None:
        """Stop taking jobs; a running batch is interrupted and its jobs wait again (no attempt counted)."""
        if self._closing:
            return
        self._closing = True
        batch = self._batch
        if batch is not None:
            batch.shutdown = True
            batch.cancel.set()
        self._changes.set()
        if self._loop_task is not None:
            done, _ = await asyncio.wait([self._loop_task], timeout=self._options.close_timeout)
            if not done:
                await self._abandon_stuck(self._loop_task, batch)
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.wait([self._watch_task])
        if self._engine is not None:
            await self._engine.close()
        try:
            await self._store.update_worker(self.id, stopped_at=wall_clock(), batch=None)
        except Exception as exc:  # the database may be the reason for stopping
            log.warning("could not record that worker %s stopped: %s", self.id, exc)
        log.info("worker %s stopped", self.id)

    async def _abandon_stuck(self, loop_task: asyncio.Task[None], batch: _Batch | None) -> None:
        log.error("the running batch did not stop within %g s; abandoning it", self._options.close_timeout)
        if batch is not None and batch.call is not None:
            batch.call.cancel()
        loop_task.cancel()
        await asyncio.wait([loop_task])
        if self._engine is not None:
            self._engine.abandon("it did not stop when the worker shut down")
        if batch is not None:
            unsettled = batch.unsettled()
            # Not counted as an attempt: the job did nothing wrong.
            await self._store.requeue(unsettled, count_attempt=False)
            batch.requeued.update(job.id for job in unsettled)

    # --- the loop ---

    async def _serve_forever(self) -> None:
        while not self._closing:
            try:
                ran = await self._serve_one()
            except Exception:
                log.exception("worker %s hit an error; going on", self.id)
                await asyncio.sleep(min(1.0, self._options.poll))
                continue
            if not ran and not self._closing:
                await wait_changed(self._changes, self._options.poll)

    async def _serve_one(self) -> bool:
        wanted = await self._store.setting(WANTED_MODEL_SETTING)
        if wanted and wanted != self._model:
            await self._switch(wanted)
            return True
        if self._model is None:
            return False
        jobs = await self._store.claim(
            self.id,
            self._model,
            self._settings.max_batch,
            lease_until=self._lease_until(),
            now=self._clock(),
        )
        if not jobs:
            return False
        await self._run_batch(_Batch(jobs))
        return True

    async def _watch_forever(self) -> None:
        """Heartbeats, leases, cancellations and expired leases of other workers."""
        every = min(self._options.poll, self._options.lease / 3)
        reaped = time.monotonic()
        while True:
            await asyncio.sleep(every)
            try:
                await self._watch_batch()
                if time.monotonic() - reaped >= self._options.lease / 2:
                    reaped = time.monotonic()
                    await self._reap()
            except Exception as exc:
                log.warning("worker %s could not reach the database: %s", self.id, exc)

    async def _watch_batch(self) -> None:
        batch = self._batch
        due = time.monotonic() - self._last_renew >= self._options.lease / 3
        if not due and batch is None:
            return
        if due:
            self._last_renew = time.monotonic()
            mine = await self._store.renew(self.id, lease_until=self._lease_until(), now=wall_clock())
        else:
            mine = await self._store.running_ids(self.id)
        if batch is None or batch is not self._batch:
            return
        for job in batch.picked:
            if job.id not in mine and job.id not in batch.settled and job.id not in batch.cancelled:
                log.info("job %d is no longer this worker's (cancelled, or taken over)", job.id)
                batch.cancelled.add(job.id)
        if batch.ids - batch.settled <= batch.cancelled:
            batch.cancel.set()

    async def _reap(self) -> None:
        waiting, failed = await self._store.reap(self._options.max_attempts, wall_clock())
        for job in waiting:
            log.warning("job %d waits again: its worker %s stopped answering", job.id, job.worker_id)
        for job in failed:
            log.warning("job %d gave up after %d attempts", job.id, job.attempts)

    def _lease_until(self) -> datetime:
        return wall_clock() + timedelta(seconds=self._options.lease)

    # --- batches ---

    async def _run_batch(self, batch: _Batch) -> None:
        self._batch = batch
        if self._closing:  # claimed while the worker began to stop: straight back in line
            batch.shutdown = True
            batch.cancel.set()
        try:
            await self._store.update_worker(self.id, batch=batch.ids)
            await self._start_batch(batch)
        except Exception:
            log.exception("the batch of jobs %s failed", sorted(batch.ids))
            await self._fail_unsettled(batch, INTERNAL_ERROR)
        finally:
            self._batch = None
            if batch.progress_task is not None:
                batch.progress_task.cancel()
            try:
                await self._store.update_worker(self.id, batch=None)
            except Exception as exc:
                log.warning("could not record that worker %s is idle: %s", self.id, exc)

    async def _start_batch(self, batch: _Batch) -> None:
        jobs, requests = [], []
        for job in batch.picked:
            try:
                requests.append(await self._with_audio(job))
                jobs.append(job)
            except (BotError, GenerationError) as exc:
                await self._fail(batch, job, f"its audio could not be loaded: {exc}")
        if jobs:
            await self._generate(batch, jobs, requests)

    async def _generate(self, batch: _Batch, jobs: list[Job], requests: list[GenerationRequest]) -> None:
        engine = await self._live_engine()
        log.debug("generating jobs %s on %s", [job.id for job in jobs], self._model)
        limit = self.time_limit(sum(job.seconds for job in jobs))
        began = time.monotonic()
        call = batch.call = asyncio.create_task(
            engine.generate(
                requests,
                progress=lambda done, total: self._on_progress(batch, jobs, done, total),
                cancel=batch.cancel,
            ),
            name=f"generate-{jobs[0].id}",
        )
        try:
            if not await self._within(call, limit, batch):
                engine.abandon(f"it was stuck for over {limit:.0f} s")
                log.error("jobs %s: the engine did not stop; it is abandoned", [job.id for job in jobs])
                await self._fail_unsettled(batch, _timed_out(limit))
                if self._on_stuck is not None:
                    self._on_stuck()
                await self._replace_engine()
                return
            if batch.timed_out and not batch.shutdown:
                # It stopped when asked, so the engine is fine; what it made is only part of a track.
                if not call.cancelled():
                    call.exception()  # whatever it ended with is superseded by the time limit
                await self._fail_unsettled(batch, _timed_out(limit))
                return
            results = call.result()
        except OutOfMemory:
            await self._out_of_memory(batch, jobs, requests)
            return
        except GenerationCancelled:
            await self._settle_cancelled(batch, jobs)
            return
        except WorkerDied as exc:
            for job in jobs:
                await self._fail(
                    batch, job, f"the generation worker stopped ({exc.reason}); please try again"
                )
            await self._replace_engine()
            return
        except GenerationError as exc:
            for job in jobs:
                await self._fail(batch, job, str(exc))
            return
        except MemoryError:
            log.error("jobs %s: the machine ran out of memory", [job.id for job in jobs])
            await self._fail_all(batch, jobs, _out_of_host_memory(jobs))
            await self._replace_engine()
            return
        except Exception:
            # An engine in an unknown state is not trusted with the next batch.
            log.exception("jobs %s: the engine failed unexpectedly", [job.id for job in jobs])
            await self._fail_all(batch, jobs, ENGINE_FAILED)
            await self._replace_engine()
            return
        finally:
            batch.call = None
        elapsed = time.monotonic() - began
        if self._on_generated is not None:
            self._on_generated(elapsed)
        await self._learn_speed(elapsed, results)
        for job, result in zip(jobs, results, strict=True):
            await self._settle(batch, job, result)

    async def _within(self, call: asyncio.Task[list[GenerationResult]], limit: float, batch: _Batch) -> bool:
        """Wait for the call; past ``limit``, ask it to stop. False: it did not stop (it is stuck)."""
        done, _ = await asyncio.wait([call], timeout=limit)
        if done:
            return True
        log.error("a batch is still generating after %.0f s, its time limit; stopping it", limit)
        batch.timed_out = True
        batch.cancel.set()
        done, _ = await asyncio.wait([call], timeout=self._options.cancel_grace)
        if done:
            return True
        call.cancel()
        return False

    def time_limit(self, audio_seconds: float) -> float:
        """How long a batch making ``audio_seconds`` of audio may generate (MUSICBOT_JOB_TIMEOUT per 10 s).

        Once the speed of this model is measured, a slow machine also gets 10 times its usual time.
        """
        limit = self._settings.job_timeout * max(1.0, audio_seconds / 10.0)
        if self._speed is not None:
            limit = max(limit, SLOWDOWN_ALLOWED * self._speed * audio_seconds)
        return limit

    async def _out_of_memory(self, batch: _Batch, jobs: list[Job], requests: list[GenerationRequest]) -> None:
        """The engine already split the batch and failed; find the job that does not fit, alone."""
        if len(jobs) == 1:
            await self._fail(
                batch,
                jobs[0],
                f"the model ran out of memory making {jobs[0].seconds:g} s of audio; ask for a shorter"
                " duration or fewer variations",
            )
            return
        log.warning("out of memory on jobs %s; running them one at a time", [job.id for job in jobs])
        for job, request in zip(jobs, requests, strict=True):
            if job.id not in batch.cancelled and job.id not in batch.settled:
                await self._generate(batch, [job], [request])

    async def _settle(self, batch: _Batch, job: Job, result: GenerationResult) -> None:
        if job.id in batch.cancelled:
            batch.settled.add(job.id)
            return
        if result.cancelled or not result.tracks:
            await self._settle_cancelled(batch, [job])
            return
        tracks = await asyncio.to_thread(encode_tracks, job.id, result)
        done = await self._store.finish_job(
            job,
            JobResult(
                result.seconds,
                result.sample_rate,
                tuple(t.seed for t in result.tracks),
                result.elapsed,
                result.notes,
            ),
            result.model,
            [stored_track(track) for track in tracks],
            self._clock(),
        )
        batch.settled.add(job.id)
        if done is None:
            log.warning("job %d: its result came after it stopped being this worker's; dropped", job.id)
            return
        log.info("job %d done (%g s on %s in %.1f s)", job.id, result.seconds, result.model, result.elapsed)

    async def _settle_cancelled(self, batch: _Batch, jobs: Sequence[Job]) -> None:
        """Jobs that stopped early: a shutdown puts them back in line, else they are cancelled."""
        for job in jobs:
            if job.id in batch.cancelled:
                pass
            elif batch.shutdown:
                await self._store.requeue([job], count_attempt=False)
                batch.requeued.add(job.id)
            else:
                await self._store.cancel_job(job, self._clock())
            batch.settled.add(job.id)

    async def _fail(self, batch: _Batch, job: Job, reason: str) -> None:
        log.warning("job %d failed: %s", job.id, reason)
        await self._store.fail_job(job, reason, self._clock())
        batch.settled.add(job.id)

    async def _fail_all(self, batch: _Batch, jobs: Sequence[Job], reason: str) -> None:
        for job in jobs:
            if job.id not in batch.settled:
                await self._fail(batch, job, reason)

    async def _fail_unsettled(self, batch: _Batch, reason: str) -> None:
        for job in batch.unsettled():
            try:
                await self._fail(batch, job, reason)
            except Exception:
                # Still 'running' in the database: its lease runs out and another attempt serves it.
                log.exception("could not record the failure of job %d", job.id)

    def _on_progress(self, batch: _Batch, jobs: Sequence[Job], done: int, total: int) -> None:
        """Called on the event loop for every step; written at most every ``progress_interval``."""
        batch.progress = (done, total)
        if batch.progress_task is None or batch.progress_task.done():
            batch.progress_task = asyncio.create_task(
                self._write_progress(batch, jobs), name=f"progress-{jobs[0].id}"
            )

    async def _write_progress(self, batch: _Batch, jobs: Sequence[Job]) -> None:
        written = None
        while batch.progress != written and self._batch is batch:
            written = batch.progress
            if written is None:
                return
            live = [job for job in jobs if job.id not in batch.cancelled and job.id not in batch.settled]
            try:
                await self._store.set_progress(live, *written)
            except Exception as exc:
                log.warning("could not record progress: %s", exc)
            await asyncio.sleep(self._options.progress_interval)

    async def _with_audio(self, job: Job) -> GenerationRequest:
        """The job's request with its audio input loaded from the database."""
        request = job.request
        if job.kind is JobKind.EXTEND and job.parent is not None:
            stored = await self._store.track(job.parent)
            request = replace(request, continuation=await asyncio.to_thread(from_flac, stored.flac))
        if job.has_melody:
            data = await self._store.melody(job.id)
            if data is None:
                raise GenerationError("its melody reference is missing")
            request = replace(request, melody=await asyncio.to_thread(from_flac, data))
        return request

    # --- the engine and its model ---

    async def _load_first(self, size: str) -> ModelInfo:
        """Load ``size``; if that stored choice no longer loads, the size from the settings."""
        engine = await self._live_engine()
        try:
            info = await engine.start(self._settings.model_source(size))
        except Exception as exc:
            if size == self._settings.model:
                raise
            log.warning("the stored model %s did not load (%s); trying %s", size, exc, self._settings.model)
            size = self._settings.model
            info = await engine.start(self._settings.model_source(size))
            await self._loaded(size, info, fallback=True)
            return info
        await self._loaded(size, info)
        return info

    async def _loaded(self, size: str, info: ModelInfo, *, fallback: bool = False) -> None:
        self._model = size
        self._speed = await self._stored_speed(size)
        await self._store.serve_model(self.id, size, info, self._clock(), fallback=fallback)

    async def _switch(self, size: str) -> None:
        """Load the wanted model between batches; on failure the old one stays and the wish goes."""
        engine = await self._live_engine()
        try:
            info = await engine.switch_model(self._settings.model_source(size))
        except Exception as exc:
            log.error("worker %s could not load %s: %s", self.id, size, exc)
            await self._store.refuse_model(self.id, size, str(exc), self._clock())
            return
        await self._loaded(size, info)
        log.info("worker %s switched to model %s", self.id, size)

    async def _live_engine(self) -> GenerationWorker:
        if self._engine is None or not self._engine.alive:
            return await self._replace_engine(load=False)
        return self._engine

    async def _replace_engine(self, *, load: bool = True) -> GenerationWorker:
        """Close the old engine (releasing its model) and start a new one."""
        old, self._engine = self._engine, None
        if old is not None:
            try:
                await old.close()
            except Exception:
                log.exception("closing the old generation worker failed")
        engine = self._engine = self._factory()
        log.warning("started a new generation worker")
        if load and self._model is not None:
            try:
                await engine.start(self._settings.model_source(self._model))
            except Exception as exc:
                # The next batch tries again and, failing, tells its users why.
                log.error("the new worker could not load %s: %s", self._model, exc)
        return engine

    async def _learn_speed(self, elapsed: float, results: Sequence[GenerationResult]) -> None:
        audio = sum(result.seconds * len(result.tracks) for result in results if not result.cancelled)
        if audio <= 0 or self._model is None:
            return
        rate = elapsed / audio
        self._speed = rate if self._speed is None else (1 - SPEED_WEIGHT) * self._speed + SPEED_WEIGHT * rate
        await self._store.set_setting(
            SPEED_SETTING.format(model=self._model), repr(self._speed), self._clock()
        )

    async def _stored_speed(self, model: str) -> float | None:
        value = await self._store.setting(SPEED_SETTING.format(model=model))
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None


def wall_clock() -> datetime:
    """Leases and heartbeats are wall-clock time, whatever clock the jobs' own timestamps use."""
    return utc_now()


def new_id(kind: str) -> str:
    """A process-unique name: host, pid and a random tail (a restarted process is a new one)."""
    return f"{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _timed_out(limit: float) -> str:
    shown = f"{limit:.0f}" if limit >= 10 else f"{limit:.1f}"
    return (
        f"making it took longer than its time limit ({shown} s), so it was stopped; please try again"
        " (an admin can raise MUSICBOT_JOB_TIMEOUT)"
    )


def _out_of_host_memory(jobs: Sequence[Job]) -> str:
    seconds = sum(job.seconds for job in jobs)
    return (
        f"the machine ran out of memory making {seconds:g} s of audio; ask for a shorter duration or"
        " fewer variations"
    )


def encode_tracks(job_id: int, result: GenerationResult) -> list[JobTrack]:
    return [
        JobTrack(
            job_id=job_id,
            index=index,
            seed=track.seed,
            audio=AudioClip(track.audio, result.sample_rate),
            flac=to_flac(track.audio, result.sample_rate),
        )
        for index, track in enumerate(result.tracks)
    ]


def stored_track(track: JobTrack) -> StoredTrack:
    return StoredTrack(
        track.job_id,
        track.index,
        track.seed,
        track.audio.sample_rate,
        track.audio.samples.shape[-1],
        track.flac,
    )
