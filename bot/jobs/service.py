"""The job service: an asyncio front over the one generation worker.

The database is the source of truth; the in-memory ``FairQueue`` is a cache of the waiting rows.
One dispatcher task, woken by an ``asyncio.Event``, takes the next fair batch, runs it on the worker
and records the outcome; the listener hears about it off the dispatcher's path.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType

from bot.jobs.codec import from_flac, to_flac
from bot.jobs.db import Database
from bot.jobs.errors import (
    BotError,
    InvalidLimit,
    JobFinished,
    LimitExceeded,
    MelodyUnavailable,
    NotAllowed,
    ServiceClosed,
)
from bot.jobs.fairqueue import FairQueue
from bot.jobs.listener import JobListener, Notifier
from bot.jobs.models import (
    Delivery,
    Job,
    JobKind,
    JobResult,
    JobTrack,
    LimitOverride,
    Origin,
    PendingRequest,
    QueueEntry,
    TrackRef,
    Usage,
)
from bot.jobs.store import JobStore, NewJob, StoredTrack
from bot.jobs.tasks import BackgroundTasks
from bot.settings import Limits, Settings
from generation import (
    AudioClip,
    GenerationCancelled,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    GenerationWorker,
    InvalidRequest,
    ModelInfo,
    OutOfMemory,
    WorkerDied,
)

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
WorkerFactory = Callable[[], GenerationWorker]

MODEL_SETTING = "model"
SPEED_SETTING = "speed.{model}"
# Weight of the newest batch in the running estimate of compute seconds per audio second.
SPEED_WEIGHT = 0.3
INTERNAL_ERROR = "something went wrong inside the bot while making this; please try again"
ENGINE_FAILED = "something went wrong in the music generator; it was restarted, please try again"
# Once the speed is measured, a batch may also take this many times its expected time.
SLOWDOWN_ALLOWED = 10.0
# A batch past its time limit is asked to stop; if it has not within this many seconds, its worker
# is abandoned (a stuck thread cannot be killed) and a new one takes over.
CANCEL_GRACE = 10.0


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False)
class _Batch:
    """The batch on the worker now; ``cancelled`` holds jobs users cancelled while it ran."""

    picked: list[Job]
    cancel: threading.Event = field(default_factory=threading.Event)
    running: dict[int, Job] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)
    settled: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    progress: float = 0.0
    shutdown: bool = False
    timed_out: bool = False
    requeued: set[int] = field(default_factory=set)
    call: asyncio.Task[list[GenerationResult]] | None = None

    @property
    def ids(self) -> set[int]:
        return {job.id for job in self.picked}

    @property
    def audio_seconds(self) -> float:
        return sum(job.seconds for job in self.picked)


class JobService:
    """Accepts jobs within limits, serves them fairly on the worker, and keeps every one in SQLite."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        worker_factory: WorkerFactory,
        *,
        listener: JobListener | None = None,
        clock: Clock = utc_now,
        max_attempts: int = 2,
        close_timeout: float = 10.0,
        cancel_grace: float = CANCEL_GRACE,
    ) -> None:
        self._settings = settings
        self._store = JobStore(db, settings.limits, settings.queue_size)
        self._worker_factory = worker_factory
        self._worker: GenerationWorker | None = None
        self._clock = clock
        self._max_attempts = max_attempts
        self._close_timeout = close_timeout
        self._cancel_grace = cancel_grace
        self._queue = FairQueue()
        self._tasks = BackgroundTasks()
        self._notifier = Notifier(self._tasks)
        if listener is not None:
            self._notifier.listener = listener
        self._wake = asyncio.Event()
        self._model_lock = asyncio.Lock()
        self._batch: _Batch | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._model = settings.model
        self._speed: float | None = None
        self._started = False
        self._closing = False

    # --- life cycle ---

    async def __aenter__(self) -> JobService:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def set_listener(self, listener: JobListener) -> None:
        """Who hears about jobs from now on (set it before ``start`` to hear about recovered ones)."""
        self._notifier.listener = listener

    async def start(self) -> None:
        """Load the model (the stored choice wins over the settings), recover jobs, start dispatching."""
        if self._started:
            raise RuntimeError("the job service was already started")
        self._started = True
        stored = await self._store.setting(MODEL_SETTING)
        worker = self._worker = self._worker_factory()
        try:
            await self._load_first_model(stored or self._settings.model)
            waiting, failed = await self._store.recover(self._max_attempts, self._clock())
        except BaseException:
            await worker.close()
            raise
        for job in failed:
            log.warning("job %d gave up after %d attempts", job.id, job.attempts)
        for job in waiting:
            self._queue.push(job)
            self._notifier.requeued(job)
        for job in await self._store.undelivered():
            self._tasks.spawn(self._hand_over(job), name=f"job-{job.id}-hand-over")
        for pending in await self._store.take_pending():
            log.warning("request %d was acknowledged but not queued before the bot stopped", pending.id)
            self._notifier.interrupted(pending)
        log.info("job service started: model %s, %d jobs waiting", self._model, len(waiting))
        self._dispatcher = self._tasks.spawn(self._dispatch_forever(), name="job-dispatcher")

    async def close(self) -> None:
        """Stop taking work; a running batch is interrupted and its jobs wait again for the next start.

        A batch that does not stop within ``close_timeout`` (a stuck generation) is put back in the
        queue all the same, and its worker abandoned, so that closing never hangs.
        """
        if self._closing:
            return
        self._closing = True
        batch = self._batch
        if batch is not None:
            batch.shutdown = True
            batch.cancel.set()
        self._wake.set()
        if self._dispatcher is not None:
            done, _ = await asyncio.wait([self._dispatcher], timeout=self._close_timeout)
            if not done:
                await self._abandon_stuck_batch(self._dispatcher, batch)
        await self._tasks.finish(self._close_timeout)
        if self._worker is not None:
            await self._worker.close()
        waiting = len(self._queue) + (len(batch.requeued) if batch is not None else 0)
        log.info("job service closed; %d jobs wait for the next start", waiting)

    async def _abandon_stuck_batch(self, dispatcher: asyncio.Task[None], batch: _Batch | None) -> None:
        log.error("the running batch did not stop within %g s; abandoning its worker", self._close_timeout)
        if batch is not None and batch.call is not None:
            batch.call.cancel()
        dispatcher.cancel()
        await asyncio.wait([dispatcher])
        if self._worker is not None:
            self._worker.abandon("it did not stop when the bot shut down")
        if batch is not None:
            unsettled = [job.id for job in batch.picked if job.id not in batch.settled]
            # Not counted as an attempt: the job did nothing wrong.
            await self._store.requeue(unsettled, count_attempt=False)
            batch.requeued.update(unsettled)

    # --- requests on their way in ---

    async def note_pending(self, request: PendingRequest) -> None:
        """Remember an acknowledged command until ``submit(pending_id=...)`` or ``drop_pending``.

        If the bot stops in between, the listener hears ``request_interrupted`` at the next start.
        """
        self._check_open()
        await self._store.add_pending(request, self._clock())

    async def drop_pending(self, request_id: int) -> None:
        """The command ended without a job (refused, or failed): nothing to tell after a restart."""
        await self._store.drop_pending(request_id)

    # --- jobs ---

    async def submit(
        self,
        request: GenerationRequest,
        origin: Origin,
        *,
        kind: JobKind = JobKind.NEW,
        parent: TrackRef | None = None,
        delivery: Delivery | None = None,
        is_admin: bool = False,
        pending_id: int | None = None,
    ) -> Job:
        """Check the limits and store the job (seed chosen now); it is queued once this returns.

        Extend jobs name the track to continue in ``parent``; the audio is loaded when the job runs.
        ``pending_id`` names the request noted with ``note_pending``: it ends with the job's insert.
        """
        self._check_open()
        _check_shape(request, kind, parent)
        _check_prompt(request.prompt)
        info = self.model_info
        if request.melody is not None and (info is None or not info.supports_melody):
            raise MelodyUnavailable(info.name if info else self._model)
        request = request.with_seed()
        melody = None
        if request.melody is not None:
            clip = request.melody
            melody = await asyncio.to_thread(to_flac, clip.samples, clip.sample_rate)
            request = replace(request, melody=None)
        new = NewJob(origin, kind, request, parent, delivery or Delivery(), melody, pending_id)
        try:
            job = await self._store.add_job(new, exempt=is_admin, now=self._clock())
        except LimitExceeded as exc:
            raise self._with_estimate(exc, origin.user_id) from None
        log.info("job %d queued for user %d (%s, %g s)", job.id, job.user_id, job.kind, job.seconds)
        self._queue.push(job)
        self._wake.set()
        return job

    async def cancel(self, job_id: int, *, user_id: int, is_admin: bool = False) -> Job:
        """Cancel a waiting or running job; only its owner or an admin may."""
        job = await self._store.job(job_id)
        if job.user_id != user_id and not is_admin:
            raise NotAllowed(f"only the person who asked for job #{job_id} or an admin can cancel it")
        if not job.state.active:
            raise JobFinished(job_id, job.state.value)
        batch = self._batch
        if self._queue.remove(job_id) is None and batch is not None and job_id in batch.ids:
            batch.cancelled.add(job_id)
            # One row of a batch cannot be stopped alone: the batch stops when all of it is cancelled.
            if batch.ids - batch.settled <= batch.cancelled:
                batch.cancel.set()
        return await self._cancel_row(job_id)

    async def cancel_waiting(self, user_id: int) -> list[Job]:
        """Cancel every waiting (not running) job of a user; the jobs cancelled."""
        waiting = [job for job in self._queue.jobs_of(user_id) if self._queue.remove(job.id)]
        cancelled = []
        for job in waiting:
            try:
                cancelled.append(await self._cancel_row(job.id))
            except JobFinished:
                continue
        return cancelled

    async def job(self, job_id: int) -> Job:
        return await self._store.job(job_id)

    async def job_for_thread(self, thread_id: int) -> Job | None:
        """The job whose result message started this thread."""
        return await self._store.job_by_thread(thread_id)

    async def recent_jobs(self, user_id: int, limit: int = 10) -> list[Job]:
        return await self._store.recent_jobs(user_id, limit)

    async def tracks(self, job_id: int) -> list[JobTrack]:
        """The stored tracks of a finished job, decoded."""
        stored = await self._store.tracks(job_id)
        return await asyncio.to_thread(_decode_tracks, stored)

    async def track(self, ref: TrackRef) -> JobTrack:
        stored = await self._store.track(ref)
        return (await asyncio.to_thread(_decode_tracks, [stored]))[0]

    async def has_track(self, ref: TrackRef) -> bool:
        return await self._store.has_track(ref)

    async def melody(self, job_id: int) -> AudioClip | None:
        """The melody reference a job was asked with (None: it had none), e.g. to make more of it."""
        data = await self._store.melody(job_id)
        return None if data is None else await asyncio.to_thread(from_flac, data)

    def queue(self, user_id: int | None = None) -> list[QueueEntry]:
        """Running jobs (position 0) then waiting ones in serving order, with estimated waits."""
        entries: list[QueueEntry] = []
        ahead = self._running_remaining()
        batch = self._batch
        if batch is not None:
            entries += [
                QueueEntry(batch.running.get(job.id, job), 0, 0.0, ahead)
                for job in batch.picked
                if job.id not in batch.cancelled and job.id not in batch.settled
            ]
        speed = self._speed
        for position, job in enumerate(self._queue.order(), start=1):
            starts_in = ahead
            ahead = ahead + job.seconds * speed if ahead is not None and speed is not None else None
            entries.append(QueueEntry(job, position, starts_in, ahead))
        return [entry for entry in entries if user_id is None or entry.job.user_id == user_id]

    def position(self, job_id: int) -> QueueEntry | None:
        """Where a job stands, or None when it is neither waiting nor running."""
        return next((entry for entry in self.queue() if entry.job.id == job_id), None)

    # --- delivery ---

    async def update_delivery(
        self,
        job_id: int,
        *,
        status_message_id: int | None = None,
        result_message_id: int | None = None,
        thread_id: int | None = None,
    ) -> Job:
        """Remember the messages the bot made for a job (None leaves a value as it is)."""
        fields = _given(
            status_message_id=status_message_id, result_message_id=result_message_id, thread_id=thread_id
        )
        return await self._store.update_delivery(job_id, fields, delivered_at=None)

    async def mark_delivered(
        self, job_id: int, *, result_message_id: int | None = None, thread_id: int | None = None
    ) -> Job:
        """The outcome reached the user: it is not handed over again, and the token is forgotten."""
        fields = _given(result_message_id=result_message_id, thread_id=thread_id)
        return await self._store.update_delivery(job_id, fields, delivered_at=self._clock())

    # --- limits ---

    async def limits(self, user_id: int | None = None) -> Limits:
        """The limits that hold for a user (None: the defaults), overrides applied."""
        return await self._store.limits(user_id)

    async def set_limits(
        self,
        user_id: int | None,
        *,
        max_queued: int | None = None,
        daily_seconds: int | None = None,
        max_duration: int | None = None,
    ) -> Limits:
        """Store an override for a user (None: for everyone); values left None stay as they were."""
        change = LimitOverride(max_queued, daily_seconds, max_duration)
        _check_override(change)
        return await self._store.set_override(user_id, change, self._clock())

    async def reset_limits(self, user_id: int | None) -> Limits:
        """Drop a user's override (None: the default override); the limits that hold now."""
        return await self._store.clear_override(user_id)

    async def limit_overrides(self) -> dict[int | None, LimitOverride]:
        return await self._store.overrides()

    async def usage(self, user_id: int, *, is_admin: bool = False) -> Usage:
        return await self._store.usage(user_id, exempt=is_admin, now=self._clock())

    # --- model ---

    @property
    def model(self) -> str:
        """The model size (or source) in use, as an admin chose it."""
        return self._model

    @property
    def model_info(self) -> ModelInfo | None:
        return self._worker.info if self._worker is not None else None

    @property
    def speed(self) -> float | None:
        """Measured compute seconds per audio second on this model (None until a job finished)."""
        return self._speed

    async def switch_model(self, size: str) -> ModelInfo:
        """Load another model after the running batch; on failure the old one stays (ModelLoadError)."""
        self._check_open()
        async with self._model_lock:
            worker = await self._live_worker()
            if size == self._model and worker.info is not None:
                return worker.info
            info = await worker.switch_model(self._settings.model_source(size))
            self._model = size
            await self._store.set_setting(MODEL_SETTING, size, self._clock())
            self._speed = await self._stored_speed(size)
        log.info("switched to model %s", size)
        return info

    # --- the dispatcher ---

    async def _dispatch_forever(self) -> None:
        while not self._closing:
            try:
                ran = await self._dispatch_one()
            except Exception:
                log.exception("the dispatcher hit an error; going on")
                await asyncio.sleep(0.1)
                continue
            if not ran:
                self._wake.clear()
                if not self._queue and not self._closing:
                    await self._wake.wait()

    async def _dispatch_one(self) -> bool:
        async with self._model_lock:
            if self._closing:
                return False
            jobs = self._queue.next_batch(self._settings.max_batch)
            if not jobs:
                return False
            await self._run_batch(_Batch(jobs))
        return True

    async def _run_batch(self, batch: _Batch) -> None:
        self._batch = batch
        try:
            await self._start_batch(batch)
        except Exception:
            log.exception("the batch of jobs %s failed", sorted(batch.ids))
            await self._fail_unsettled(batch, INTERNAL_ERROR)
        finally:
            self._batch = None

    async def _start_batch(self, batch: _Batch) -> None:
        info = self.model_info
        started = await self._store.mark_running(
            [job.id for job in batch.picked], info.name if info else self._model, self._clock()
        )
        batch.settled |= batch.ids - {job.id for job in started}
        for job in started:
            batch.running[job.id] = job
            self._notifier.started(job)
        if not started:
            return
        problem = await self._ensure_model()
        if problem is not None:
            for job in started:
                await self._fail(batch, job, problem)
            return
        jobs, requests = [], []
        for job in started:
            try:
                requests.append(await self._with_audio(job))
                jobs.append(job)
            except (BotError, GenerationError) as exc:
                await self._fail(batch, job, f"its audio could not be loaded: {exc}")
        if jobs:
            await self._generate(batch, jobs, requests)

    async def _generate(self, batch: _Batch, jobs: list[Job], requests: list[GenerationRequest]) -> None:
        worker = await self._live_worker()
        log.debug("generating jobs %s on %s", [job.id for job in jobs], self._model)
        limit = self.time_limit(sum(job.seconds for job in jobs))
        began = time.monotonic()
        call = batch.call = asyncio.create_task(
            worker.generate(
                requests,
                progress=lambda done, total: self._on_progress(batch, jobs, done, total),
                cancel=batch.cancel,
            ),
            name=f"generate-{jobs[0].id}",
        )
        try:
            if not await self._within(call, limit, batch):
                worker.abandon(f"it was stuck for over {limit:.0f} s")
                log.error("jobs %s: the worker did not stop; it is abandoned", [job.id for job in jobs])
                await self._fail_unsettled(batch, _timed_out(limit))
                await self._replace_worker()
                return
            if batch.timed_out and not batch.shutdown:
                # It stopped when asked, so the worker is fine; what it made is only part of a track.
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
            await self._replace_worker()
            return
        except GenerationError as exc:
            for job in jobs:
                await self._fail(batch, job, str(exc))
            return
        except MemoryError:
            log.error("jobs %s: the machine ran out of memory", [job.id for job in jobs])
            await self._fail_all(batch, jobs, _out_of_host_memory(jobs))
            await self._replace_worker()
            return
        except Exception:
            # An engine in an unknown state is not trusted with the next batch.
            log.exception("jobs %s: the engine failed unexpectedly", [job.id for job in jobs])
            await self._fail_all(batch, jobs, ENGINE_FAILED)
            await self._replace_worker()
            return
        finally:
            batch.call = None
        await self._learn_speed(time.monotonic() - began, results)
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
        done, _ = await asyncio.wait([call], timeout=self._cancel_grace)
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
        """The worker already split the batch and failed; find the job that does not fit, alone."""
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
        tracks = await asyncio.to_thread(_encode_tracks, job.id, result)
        done = await self._store.finish_job(
            job.id,
            JobResult(
                result.seconds, result.sample_rate, tuple(t.seed for t in result.tracks), result.elapsed
            ),
            result.model,
            [_stored(track) for track in tracks],
            self._clock(),
        )
        batch.settled.add(job.id)
        if done is not None:
            log.info(
                "job %d done (%g s on %s in %.1f s)", job.id, result.seconds, result.model, result.elapsed
            )
            self._notifier.finished(done, tracks)

    async def _settle_cancelled(self, batch: _Batch, jobs: Sequence[Job]) -> None:
        """Jobs that stopped early: a shutdown puts them back in line, else they are cancelled."""
        for job in jobs:
            if job.id in batch.cancelled:
                pass
            elif batch.shutdown:
                await self._store.requeue([job.id], count_attempt=False)
                batch.requeued.add(job.id)
            else:
                cancelled = await self._store.cancel_job(job.id, self._clock())
                if cancelled is not None:
                    self._notifier.cancelled(cancelled)
            batch.settled.add(job.id)

    async def _fail(self, batch: _Batch, job: Job, reason: str) -> None:
        log.warning("job %d failed: %s", job.id, reason)
        failed = await self._store.fail_job(job.id, reason, self._clock())
        batch.settled.add(job.id)
        if failed is not None:
            self._notifier.failed(failed, reason)

    async def _fail_all(self, batch: _Batch, jobs: Sequence[Job], reason: str) -> None:
        for job in jobs:
            if job.id not in batch.settled:
                await self._fail(batch, job, reason)

    async def _fail_unsettled(self, batch: _Batch, reason: str) -> None:
        for job in batch.picked:
            if job.id in batch.settled:
                continue
            try:
                await self._fail(batch, job, reason)
            except Exception:
                # Still 'running' in the database: the next start serves it again.
                log.exception("could not record the failure of job %d", job.id)

    def _on_progress(self, batch: _Batch, jobs: Sequence[Job], done: int, total: int) -> None:
        batch.progress = done / total if total else 0.0
        for job in jobs:
            if job.id not in batch.cancelled:
                self._notifier.progress(job, done, total)

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

    async def _hand_over(self, job: Job) -> None:
        """Give the listener an outcome it has not confirmed delivering (after a restart)."""
        if job.error is not None or job.result is None:
            self._notifier.failed(job, job.error or "it failed")
            return
        self._notifier.finished(job, await self.tracks(job.id))

    # --- the worker and its model ---

    async def _load_first_model(self, size: str) -> None:
        """Load ``size``; if that stored choice no longer loads, the size from the settings."""
        worker = await self._live_worker()
        try:
            await worker.start(self._settings.model_source(size))
            self._model = size
        except Exception as exc:
            if size == self._settings.model:
                raise
            log.warning("the stored model %s did not load (%s); trying %s", size, exc, self._settings.model)
            await worker.start(self._settings.model_source(self._settings.model))
            self._model = self._settings.model
        self._speed = await self._stored_speed(self._model)

    async def _live_worker(self) -> GenerationWorker:
        if self._worker is None or not self._worker.alive:
            return await self._replace_worker(load=False)
        return self._worker

    async def _ensure_model(self) -> str | None:
        """A live worker with the current model loaded; else why not."""
        worker = await self._live_worker()
        if worker.info is not None:
            return None
        try:
            await worker.start(self._settings.model_source(self._model))
        except Exception as exc:
            log.error("the model %s could not be loaded: %s", self._model, exc)
            return f"the model could not be loaded: {exc}"
        return None

    async def _replace_worker(self, *, load: bool = True) -> GenerationWorker:
        """Close the old worker (releasing its model) and start a new one."""
        old, self._worker = self._worker, None
        if old is not None:
            try:
                await old.close()
            except Exception:
                log.exception("closing the old generation worker failed")
        worker = self._worker = self._worker_factory()
        log.warning("started a new generation worker")
        if load:
            try:
                await worker.start(self._settings.model_source(self._model))
            except Exception as exc:
                # The next batch tries again and, failing, tells its users why.
                log.error("the new worker could not load %s: %s", self._model, exc)
        return worker

    async def _learn_speed(self, elapsed: float, results: Sequence[GenerationResult]) -> None:
        audio = sum(result.seconds * len(result.tracks) for result in results if not result.cancelled)
        if audio <= 0:
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

    # --- helpers ---

    def _check_open(self) -> None:
        if not self._started or self._closing:
            raise ServiceClosed()

    async def _cancel_row(self, job_id: int) -> Job:
        cancelled = await self._store.cancel_job(job_id, self._clock())
        if cancelled is None:
            raise JobFinished(job_id, (await self._store.job(job_id)).state.value)
        log.info("job %d cancelled", job_id)
        self._notifier.cancelled(cancelled)
        return cancelled

    def _running_remaining(self) -> float | None:
        """Estimated seconds until the running batch is done (0 when none runs)."""
        batch = self._batch
        if batch is None:
            return 0.0
        elapsed = time.monotonic() - batch.started
        if batch.progress > 0:
            return max(0.0, elapsed / batch.progress - elapsed)
        if self._speed is None:
            return None
        return max(0.0, self._speed * batch.audio_seconds - elapsed)

    def _with_estimate(self, exc: LimitExceeded, user_id: int) -> LimitExceeded:
        """A ``max_queued`` refusal says when the user's first job should be done."""
        if exc.limit != "max_queued":
            return exc
        waits = [entry.done_in for entry in self.queue(user_id) if entry.done_in is not None]
        if not waits:
            return exc
        return LimitExceeded.max_queued(int(exc.value), self._clock() + timedelta(seconds=min(waits)))


def _check_shape(request: GenerationRequest, kind: JobKind, parent: TrackRef | None) -> None:
    if request.continuation is not None:
        raise ValueError("submit an extension as kind=EXTEND with parent=TrackRef(...), not audio")
    if kind is JobKind.EXTEND:
        if parent is None:
            raise ValueError("an extension needs the parent track to continue")
        if request.loop:
            raise InvalidRequest("loop", "a loop cannot also extend an existing track")
    elif kind is JobKind.NEW and parent is not None:
        raise ValueError("a new job has no parent; use VARIATIONS, EXTEND or REGENERATE")


def _check_prompt(prompt: str) -> None:
    """What GenerationRequest lets through but no text should hold: halves of surrogate pairs."""
    if any("\ud800" <= ch <= "\udfff" for ch in prompt):
        raise InvalidRequest("prompt", "the prompt contains characters that are not valid text")


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


def _check_override(change: LimitOverride) -> None:
    for name, value, least in (
        ("max_queued", change.max_queued, 0),
        ("daily_seconds", change.daily_seconds, 0),
        ("max_duration", change.max_duration, 1),
    ):
        if value is not None and value < least:
            raise InvalidLimit(name, f"{name} must be at least {least} (got {value})")


def _given(**values: int | None) -> dict[str, int]:
    return {name: value for name, value in values.items() if value is not None}


def _encode_tracks(job_id: int, result: GenerationResult) -> list[JobTrack]:
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


def _decode_tracks(stored: Sequence[StoredTrack]) -> list[JobTrack]:
    return [JobTrack(t.job_id, t.index, t.seed, from_flac(t.flac), t.flac) for t in stored]


def _stored(track: JobTrack) -> StoredTrack:
    return StoredTrack(
        track.job_id,
        track.index,
        track.seed,
        track.audio.sample_rate,
        track.audio.samples.shape[-1],
        track.flac,
    )
