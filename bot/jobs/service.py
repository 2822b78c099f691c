"""The bot side of the job service: submit, cancel, queue and deliver, over the shared store.

Every bot process (one, or several shards) and every worker process shares one store, the source of
truth. This side never runs a model: workers claim the jobs (``bot.jobs.worker``). It learns what
happened to the jobs it owns by looking at the store: at once when a change is notified (PostgreSQL's
``LISTEN``, or a write in this process), else every ``poll`` seconds; each look re-reads the active
rows, so nothing is missed when a notification is. The listener hears of each change of a job this
bot owns, in order; the jobs of a bot that stopped answering are adopted by another.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from types import TracebackType

from bot.jobs.db import JobsDatabase, wait_changed
from bot.jobs.errors import (
    InvalidLimit,
    JobFinished,
    LimitExceeded,
    MelodyUnavailable,
    NotAllowed,
    ServiceClosed,
)
from bot.jobs.fairqueue import FairQueue
from bot.jobs.flac import from_flac, to_flac
from bot.jobs.listener import JobListener, Notifier
from bot.jobs.models import (
    Clock,
    Delivery,
    Job,
    JobKind,
    JobState,
    JobTrack,
    LimitOverride,
    Origin,
    PendingRequest,
    QueueEntry,
    TrackRef,
    Usage,
    utc_now,
)
from bot.jobs.store import Board, JobStore, NewJob, StoredTrack
from bot.jobs.tasks import BackgroundTasks
from bot.jobs.worker import JobWorker, WorkerFactory, WorkerOptions, new_id, wall_clock
from bot.settings import Limits, Settings
from generation import AudioClip, GenerationRequest, InvalidRequest, ModelInfo, ModelLoadError

log = logging.getLogger(__name__)


# A batch past its time limit is asked to stop; if it has not within this many seconds, its engine is
# abandoned (a stuck thread cannot be killed) and, in a worker process, the process is replaced.
CANCEL_GRACE = 10.0
# The longest /model waits for a worker to load the model asked for (a first download can be long).
MODEL_SWITCH_TIMEOUT = 600.0


@dataclass(frozen=True)
class ServiceOptions:
    """How the bot side keeps time: ``poll`` between looks when nothing is notified; a bot whose
    heartbeat is older than ``bot_lease`` is presumed dead and its jobs are adopted by another."""

    poll: float = 0.25
    bot_lease: float = 30.0
    # After a wake, changes are gathered this long, so that a burst of them costs one look.
    coalesce: float = 0.05


@dataclass(frozen=True)
class _Seen:
    """What the listener was last told of a job."""

    state: JobState
    attempts: int
    progress: tuple[int, int] | None

    @classmethod
    def of(cls, job: Job) -> _Seen:
        return cls(job.state, job.attempts, job.progress)


_NEW = _Seen(JobState.QUEUED, 0, None)
_EMPTY_BOARD = Board([], {}, 0, [], None, None, None)


class JobService:
    """Accepts jobs within limits, shows the shared queue, and hands this bot's outcomes to the listener.

    ``worker_factory`` runs a worker side in this process too, on the same database (tests and tools);
    ``musicbot run`` runs its workers as processes instead (``bot.supervisor``).
    """

    def __init__(
        self,
        db: JobsDatabase,
        settings: Settings,
        worker_factory: WorkerFactory | None = None,
        *,
        listener: JobListener | None = None,
        clock: Clock = utc_now,
        max_attempts: int = 2,
        close_timeout: float = 10.0,
        cancel_grace: float = CANCEL_GRACE,
        options: ServiceOptions | None = None,
        worker_options: WorkerOptions | None = None,
        bot_id: str | None = None,
        shards: str | None = None,
    ) -> None:
        self.id = bot_id or new_id("bot")
        self._db = db
        self._settings = settings
        self._store = JobStore(db, settings.limits, settings.queue_size)
        self._clock = clock
        self._options = options or ServiceOptions()
        self._shards = shards
        self._close_timeout = close_timeout
        self._max_attempts = max_attempts
        self._worker: JobWorker | None = None
        if worker_factory is not None:
            base = worker_options or WorkerOptions()
            self._worker = JobWorker(
                db,
                settings,
                worker_factory,
                clock=clock,
                options=replace(
                    base, max_attempts=max_attempts, cancel_grace=cancel_grace, close_timeout=close_timeout
                ),
            )
        self._tasks = BackgroundTasks()
        self._notifier = Notifier(self._tasks)
        if listener is not None:
            self._notifier.listener = listener
        self._changes = db.subscribe()
        self._model_lock = asyncio.Lock()
        self._looking = asyncio.Lock()
        self._board = _EMPTY_BOARD
        self._active: dict[int, Job] = {}
        self._seen: dict[int, _Seen] = {}
        self._held: set[int] = set()
        self._watcher: asyncio.Task[None] | None = None
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
        """Register this bot, start the in-process worker if any (it loads the model), adopt the jobs
        of bots that are gone, and start watching."""
        if self._started:
            raise RuntimeError("the job service was already started")
        self._started = True
        await self._store.register_bot(self.id, socket.gethostname(), os.getpid(), self._shards, wall_clock())
        if not self._db.shared:
            # The only bot of this file is starting: no worker from before is still serving it.
            await self._store.expire_all_workers(wall_clock())
            await self._store.reap(self._max_attempts, wall_clock())
        if self._worker is not None:
            await self._worker.start()
        await self._look(announce=False)
        await self._adopt_orphans()
        waiting = sum(1 for job in self._active.values() if job.state is JobState.QUEUED)
        log.info("job service %s started: model %s, %d jobs waiting", self.id, self.model, waiting)
        self._watcher = self._tasks.spawn(self._watch_forever(), name="job-watcher")

    async def close(self) -> None:
        """Stop taking work. The in-process worker's running batch waits again for the next start."""
        if self._closing:
            return
        self._closing = True
        if self._worker is not None:
            await self._worker.close()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait([self._watcher])
        await self._tasks.finish(self._close_timeout)
        try:
            await self._store.bot_alive(self.id, wall_clock(), stopped=True)
        except Exception as exc:
            log.warning("could not record that this bot stopped: %s", exc)
        waiting = sum(1 for job in self._active.values() if job.state.active)
        log.info("job service closed; %d jobs wait", waiting)

    def _live_since(self) -> datetime | None:
        """Bots with a heartbeat since then are alive (None: this is the only bot of the database)."""
        if not self._db.shared:
            return None
        return wall_clock() - timedelta(seconds=self._options.bot_lease)

    # --- watching the store ---

    async def _watch_forever(self) -> None:
        beat = 0.0
        # Heartbeats three times a lease, however quiet the queue.
        every = min(self._options.poll, self._options.bot_lease / 3)
        while not self._closing:
            await wait_changed(self._changes, every)
            await asyncio.sleep(self._options.coalesce)
            if self._closing:
                return
            try:
                await self._look()
                if asyncio.get_running_loop().time() - beat >= self._options.bot_lease / 3:
                    beat = asyncio.get_running_loop().time()
                    await self._keep_alive()
            except Exception as exc:
                log.warning("could not read the jobs from the database: %s", exc)
                await asyncio.sleep(min(1.0, self._options.poll * 4))

    async def _keep_alive(self) -> None:
        """Heartbeat; adopt the jobs of bots that stopped answering; end leases of dead workers."""
        await self._store.bot_alive(self.id, wall_clock())
        if self._db.shared:
            await self._adopt_orphans()
        await self._store.reap(self._max_attempts, wall_clock())

    async def _adopt_orphans(self) -> None:
        """Jobs and pending requests of bots that are gone (after a restart, or that stopped
        answering) become this bot's: the listener hears where each stands."""
        live_since = self._live_since()
        for job in await self._store.adopt(self.id, live_since=live_since):
            log.info("job %d: its bot %s is gone; this bot answers it", job.id, job.owner_id)
            self._seen[job.id] = _Seen.of(job)
            self._announce_adopted(job)
        for pending in await self._store.take_pending(self.id, live_since=live_since):
            log.warning("request %d was acknowledged but not queued before its bot stopped", pending.id)
            self._notifier.interrupted(pending)

    async def _look(self, *, announce: bool = True) -> None:
        """Read the shared state and tell the listener what changed (one look at a time, so that
        an older read can never follow a newer one)."""
        async with self._looking:
            await self._look_once(announce)

    async def _look_quietly(self) -> None:
        """A look after this bot changed a job: the change is made whether or not the look succeeds
        (the watcher looks again soon)."""
        try:
            await self._look()
        except Exception as exc:
            log.warning("could not read the jobs from the database: %s", exc)

    async def _look_once(self, announce: bool) -> None:
        board = await self._store.board(self.id)
        self._board = board
        self._active = {job.id: job for job in board.jobs if job.state.active}
        mine = [job for job in board.jobs if job.owner_id == self.id]
        if announce:
            for job in mine:
                if job.id in self._held:
                    continue
                before = self._seen.get(job.id, _NEW)
                self._seen[job.id] = _Seen.of(job)
                self._announce(job, before)
        listed = {job.id for job in mine}
        for job_id in [job_id for job_id in self._seen if job_id not in listed]:
            del self._seen[job_id]

    def _announce(self, job: Job, before: _Seen) -> None:
        """Tell the listener what changed since ``before``, in the order it happened."""
        now = _Seen.of(job)
        if now == before:
            return
        if job.state is JobState.QUEUED:
            if before.state is JobState.RUNNING:
                self._notifier.requeued(job)
        elif job.state is JobState.RUNNING:
            if before.state is not JobState.RUNNING or before.attempts != job.attempts:
                self._notifier.started(job)
            if job.progress is not None and job.progress != before.progress:
                self._notifier.progress(job, *job.progress)
        elif before.state.active:
            if before.state is JobState.QUEUED and job.state is not JobState.CANCELLED:
                self._notifier.started(job)
            self._spawn_hand_over(job)

    def _announce_adopted(self, job: Job) -> None:
        """A job this bot took over (after a restart, or from a bot that stopped answering)."""
        if job.state is JobState.QUEUED:
            self._notifier.requeued(job)
        elif job.state is JobState.RUNNING:
            self._notifier.started(job)
        else:
            self._spawn_hand_over(job)

    def _spawn_hand_over(self, job: Job) -> None:
        # Off the look's path: the tracks are read and decoded first. What the listener was told of
        # this job before is already in its chain, so the order holds.
        self._tasks.spawn(self._hand_over(job), name=f"job-{job.id}-hand-over")

    async def _hand_over(self, job: Job) -> None:
        """Give the listener an outcome it has not confirmed delivering."""
        if job.state is JobState.CANCELLED:
            self._notifier.cancelled(job)
        elif job.error is not None or job.result is None:
            self._notifier.failed(job, job.error or "it failed")
        else:
            self._notifier.finished(job, await self.tracks(job.id))

    # --- requests on their way in ---

    async def note_pending(self, request: PendingRequest) -> None:
        """Remember an acknowledged command until ``submit(pending_id=...)`` or ``drop_pending``.

        If the bot stops in between, the listener hears ``request_interrupted`` at the next start.
        """
        self._check_open()
        await self._store.add_pending(request, self._clock(), owner_id=self.id)

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
        hold_events: bool = False,
    ) -> Job:
        """Check the limits and store the job (seed chosen now); it is queued once this returns.

        Extend jobs name the track to continue in ``parent``; the audio is loaded when the job runs.
        ``pending_id`` names the request noted with ``note_pending``: it ends with the job's insert.
        ``hold_events``: the listener hears nothing of this job until ``release_events`` (the caller
        first puts up the job's status message, which it owns from then on).
        """
        self._check_open()
        _check_shape(request, kind, parent)
        _check_prompt(request.prompt)
        info = self.model_info
        if request.melody is not None and (info is None or not info.supports_melody):
            raise MelodyUnavailable(info.name if info else self.model)
        request = request.with_seed()
        melody = None
        if request.melody is not None:
            clip = request.melody
            melody = await asyncio.to_thread(to_flac, clip.samples, clip.sample_rate)
            request = replace(request, melody=None)
        new = NewJob(
            origin, kind, request, parent, delivery or Delivery(), melody, pending_id, owner_id=self.id
        )
        try:
            job = await self._store.add_job(new, exempt=is_admin, now=self._clock())
        except LimitExceeded as exc:
            raise self._with_estimate(exc, origin.user_id) from None
        log.info("job %d queued for user %d (%s, %g s)", job.id, job.user_id, job.kind, job.seconds)
        self._seen.setdefault(job.id, _Seen.of(job))
        if hold_events:
            self._held.add(job.id)
        await self._look_quietly()  # the queue as it is now, this job in it
        return job

    def release_events(self, job_id: int) -> None:
        """The listener hears of the job from now on (what happened meanwhile comes at once)."""
        self._held.discard(job_id)
        self._changes.set()

    async def cancel(self, job_id: int, *, user_id: int, is_admin: bool = False) -> Job:
        """Cancel a waiting or running job; only its owner or an admin may.

        A running job stops when its worker sees the row cancelled; one row of a batch cannot be
        stopped alone, so a batch stops when all of it is cancelled.
        """
        job = await self._store.job(job_id)
        if job.user_id != user_id and not is_admin:
            raise NotAllowed(f"only the person who asked for job #{job_id} or an admin can cancel it")
        if not job.state.active:
            raise JobFinished(job_id, job.state.value)
        return await self._cancel_row(job_id)

    async def cancel_waiting(self, user_id: int) -> list[Job]:
        """Cancel every waiting (not running) job of a user; the jobs cancelled."""
        waiting = [
            job for job in self._active.values() if job.user_id == user_id and job.state is JobState.QUEUED
        ]
        cancelled = []
        for job in sorted(waiting, key=lambda job: job.id):
            try:
                cancelled.append(await self._cancel_row(job.id, only_waiting=True))
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
        """Running jobs (position 0) then waiting ones in serving order, with estimated waits.

        Read from the shared state as this bot last looked (a fraction of a second ago): the jobs of
        every bot process, whose turn it is, and what each worker is doing.
        """
        running = sorted(
            (job for job in self._active.values() if job.state is JobState.RUNNING), key=lambda job: job.id
        )
        waiting = FairQueue(self._board.last_served, self._board.turn)
        for job in self._active.values():
            if job.state is JobState.QUEUED:
                waiting.push(job)
        free = self._worker_free_in(running)
        entries = [QueueEntry(job, 0, 0.0, free.get(job.worker_id)) for job in running]
        speed = self.speed
        slots = sorted(free.values(), key=lambda value: math.inf if value is None else value) or [None]
        for position, job in enumerate(waiting.order(), start=1):
            starts_in = slots[0]
            done_in = starts_in + job.seconds * speed if starts_in is not None and speed is not None else None
            entries.append(QueueEntry(job, position, starts_in, done_in))
            slots = sorted([*slots[1:], done_in], key=lambda value: math.inf if value is None else value)
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

    @property
    def worker(self) -> JobWorker | None:
        """The worker side run in this process, if any."""
        return self._worker

    # --- model ---

    @property
    def model(self) -> str:
        """The model size (or source) served, as an admin chose it."""
        return self._board.model or self._settings.model

    @property
    def model_info(self) -> ModelInfo | None:
        """The served model as a live worker loaded it (None while no worker serves it)."""
        if self._worker is not None and self._worker.model == self.model and self._worker.info is not None:
            return self._worker.info
        return next(
            (w.model_info for w in self._board.workers if w.model == self.model and w.model_info is not None),
            None,
        )

    @property
    def speed(self) -> float | None:
        """Measured compute seconds per audio second on this model (None until a job finished)."""
        return self._board.speed

    async def switch_model(self, size: str) -> ModelInfo:
        """Ask the workers for another model; they load it after their running batch.

        Returns when a worker serves it; raises ``ModelLoadError`` (the old model stays) when the
        worker could not load it, or when no worker runs to load it.
        """
        self._check_open()
        async with self._model_lock:
            await self._look(announce=False)
            info = self.model_info
            if size == self.model and info is not None:
                return info
            if not self._board.workers:
                raise ModelLoadError(
                    size, "no generation worker is running to load it (start one with `musicbot worker`)"
                )
            await self._store.want_model(size, self._clock())
            info = await self._wait_for_model(size)
        log.info("switched to model %s", size)
        return info

    async def _wait_for_model(self, size: str) -> ModelInfo:
        changes = self._db.subscribe()
        try:
            return await self._model_served(size, changes)
        finally:
            self._db.unsubscribe(changes)

    async def _model_served(self, size: str, changes: asyncio.Event) -> ModelInfo:
        async with asyncio.timeout(MODEL_SWITCH_TIMEOUT):
            while True:
                await wait_changed(changes, self._options.poll)
                await self._look(announce=False)
                info = self.model_info
                if self.model == size and info is not None:
                    return info
                if self._board.wanted_model != size:
                    errors = [w.last_error or "" for w in self._board.workers]
                    reason = next(
                        (e for e in errors if e.startswith(f"{size}: ")),
                        f"{size}: the workers did not load it",
                    )
                    raise ModelLoadError(size, reason.removeprefix(f"{size}: "))

    # --- helpers ---

    def _check_open(self) -> None:
        if not self._started or self._closing:
            raise ServiceClosed()

    async def _cancel_row(self, job_id: int, *, only_waiting: bool = False) -> Job:
        cancelled = await self._store.cancel_job(job_id, self._clock(), only_waiting=only_waiting)
        if cancelled is None:
            raise JobFinished(job_id, (await self._store.job(job_id)).state.value)
        log.info("job %d cancelled", job_id)
        await self._look_quietly()
        return cancelled

    def _worker_free_in(self, running: Sequence[Job]) -> dict[str | None, float | None]:
        """Estimated seconds until each live worker is free (0 when idle; None: unknown)."""
        now = self._clock()
        free: dict[str | None, float | None] = {w.id: 0.0 for w in self._board.workers}
        batches: dict[str | None, list[Job]] = {}
        for job in running:
            batches.setdefault(job.worker_id, []).append(job)
        for worker_id, jobs in batches.items():
            started = min((job.started_at for job in jobs if job.started_at is not None), default=now)
            elapsed = max(0.0, (now - started).total_seconds())
            progress = next((job.progress for job in jobs if job.progress is not None), None)
            if progress is not None and progress[0] > 0:
                free[worker_id] = max(0.0, elapsed * progress[1] / progress[0] - elapsed)
            elif self.speed is not None:
                free[worker_id] = max(0.0, self.speed * sum(job.seconds for job in jobs) - elapsed)
            else:
                free[worker_id] = None
        return free

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


def _decode_tracks(stored: Sequence[StoredTrack]) -> list[JobTrack]:
    return [JobTrack(t.job_id, t.index, t.seed, from_flac(t.flac), t.flac) for t in stored]
