"""Jobs, tracks, limits, settings, workers and bots: the source of truth every process shares.

One set of SQL for both backends (SQLite and PostgreSQL, see ``db`` and ``pgdb``).

- Limits are never counters: every check is derived from the job rows inside the transaction that
  inserts the new job, which holds the admission lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an
  advisory lock), so two requests from any processes cannot both slip past one.
- Workers claim a fair batch under the claim lock; whose turn it is lives in ``fair_turns``.
- A claimed job carries its worker's id and attempt number and a lease the worker renews. Every write
  a worker makes about a job is fenced by both, so a late result from a worker presumed dead (its
  lease ran out and the job went to another) changes nothing.
- Each job has an owner: the bot process that answers its user. A bot whose heartbeat stops is
  presumed dead, and another takes over its jobs.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from bot.jobs.db import JobsDatabase, Tx, from_db_time, to_db_time
from bot.jobs.errors import JobNotFound, LimitExceeded, QueueFull, TrackNotFound
from bot.jobs.fairqueue import FairQueue
from bot.jobs.models import (
    Delivery,
    Job,
    JobKind,
    JobResult,
    JobState,
    LimitOverride,
    Origin,
    PendingRequest,
    TrackRef,
    Usage,
    job_seconds,
    utc_now,
)
from bot.settings import Limits
from generation import GenerationRequest, ModelInfo, SamplingParams

DAILY_WINDOW = timedelta(hours=24)
# Advisory lock keys (PostgreSQL): submissions, and claims of the next fair batch.
ADMISSION_LOCK = 0x6D75_7369_6301
CLAIM_LOCK = 0x6D75_7369_6302
MODEL_SETTING = "model"
# The model an admin asked for; workers load it and then make it the ``model`` (or refuse it).
WANTED_MODEL_SETTING = "model.wanted"
SPEED_SETTING = "speed.{model}"
# Float sums of seconds: a request that exactly fills the limit must pass.
EPSILON = 1e-6
COUNTED_STATES = ("queued", "running", "done")


@dataclass(frozen=True)
class NewJob:
    """A job to insert: the request already carries its seed; audio input travels as FLAC."""

    origin: Origin
    kind: JobKind
    request: GenerationRequest
    parent: TrackRef | None = None
    delivery: Delivery = field(default_factory=Delivery)
    melody_flac: bytes | None = None
    pending_id: int | None = None
    owner_id: str | None = None


@dataclass(frozen=True)
class StoredTrack:
    job_id: int
    index: int
    seed: int
    sample_rate: int
    samples: int
    flac: bytes = field(repr=False)


@dataclass(frozen=True)
class WorkerRow:
    """A worker process as it registered and last reported."""

    id: str
    host: str
    pid: int
    device: str
    started_at: datetime
    heartbeat_at: datetime
    model: str | None = None
    model_info: ModelInfo | None = None
    batch: tuple[int, ...] = ()
    stopped_at: datetime | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class Board:
    """What the bot reads each time it looks: see ``JobStore.board``."""

    jobs: list[Job]
    last_served: dict[int, int]
    turn: int
    workers: list[WorkerRow]
    model: str | None
    wanted_model: str | None
    speed: float | None


class JobStore:
    """SQL for jobs and limits; ``defaults`` are the limits from the environment."""

    def __init__(self, db: JobsDatabase, defaults: Limits, queue_size: int) -> None:
        self._db = db
        self._defaults = defaults
        self._queue_size = queue_size

    # --- jobs ---

    async def add_job(self, new: NewJob, *, exempt: bool, now: datetime) -> Job:
        """Check every limit against the rows and insert the job, in one transaction."""
        seconds = job_seconds(new.request)
        async with self._db.transaction() as tx:
            await tx.lock(ADMISSION_LOCK)
            if new.parent is not None:
                await _check_parent(tx, new.kind, new.parent)
            await self._check_limits(tx, new.origin.user_id, new.request.duration, seconds, exempt, now)
            row = await tx.fetchone(
                """
                INSERT INTO jobs (user_id, guild_id, channel_id, kind, parent_id, parent_track, request,
                                  seconds, has_melody, created_at, application_id, interaction_token,
                                  interaction_created_at, status_message_id, result_message_id, thread_id,
                                  owner_id)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                RETURNING *
                """,
                (
                    new.origin.user_id,
                    new.origin.guild_id,
                    new.origin.channel_id,
                    new.kind.value,
                    new.parent.job_id if new.parent else None,
                    new.parent.index if new.parent else None,
                    request_to_json(new.request),
                    seconds,
                    int(new.melody_flac is not None),
                    to_db_time(now),
                    new.delivery.application_id,
                    new.delivery.interaction_token,
                    _time_or_none(new.delivery.interaction_created_at),
                    new.delivery.status_message_id,
                    new.delivery.result_message_id,
                    new.delivery.thread_id,
                    new.owner_id,
                ),
            )
            if row is None:
                raise RuntimeError("INSERT ... RETURNING gave no row")
            await tx.notify()
            if new.melody_flac is not None:
                await tx.execute(
                    "INSERT INTO job_audio (job_id, role, flac) VALUES (?, 'melody', ?)",
                    (row["id"], new.melody_flac),
                )
            if new.pending_id is not None:
                await tx.execute("DELETE FROM pending_requests WHERE id = ?", (new.pending_id,))
        return job_from_row(row)

    # --- requests acknowledged but not queued yet ---

    async def add_pending(self, request: PendingRequest, now: datetime, owner_id: str | None = None) -> None:
        delivery = request.delivery
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM pending_requests WHERE id = ?", (request.id,))
            await tx.execute(
                """
                INSERT INTO pending_requests
                    (id, user_id, guild_id, channel_id, application_id, interaction_token,
                     interaction_created_at, status_message_id, created_at, owner_id)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """,
                (
                    request.id,
                    request.origin.user_id,
                    request.origin.guild_id,
                    request.origin.channel_id,
                    delivery.application_id,
                    delivery.interaction_token,
                    _time_or_none(delivery.interaction_created_at),
                    delivery.status_message_id,
                    to_db_time(now),
                    owner_id,
                ),
            )

    async def drop_pending(self, request_id: int) -> None:
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM pending_requests WHERE id = ?", (request_id,))

    async def take_pending(
        self, bot_id: str | None = None, *, live_since: datetime | None = None
    ) -> list[PendingRequest]:
        """Pending requests whose bot is gone, removed: each is told about once, by one bot.

        With ``live_since`` None (one bot per database) every pending request is this bot's to tell;
        else only those of bots whose heartbeat is older than ``live_since`` (or that stopped).
        """
        async with self._db.transaction() as tx:
            if live_since is None:
                rows = await tx.fetchall("DELETE FROM pending_requests RETURNING *")
            else:
                rows = await tx.fetchall(
                    f"""
                    DELETE FROM pending_requests
                    WHERE owner_id IS NULL OR owner_id = ? OR owner_id NOT IN ({_LIVE_BOTS})
                    RETURNING *
                    """,
                    (bot_id, to_db_time(live_since)),
                )
        return [_pending_from_row(row) for row in sorted(rows, key=lambda row: row["id"])]

    async def job(self, job_id: int) -> Job:
        async with self._db.snapshot() as tx:
            row = await tx.fetchone("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise JobNotFound(job_id)
        return job_from_row(row)

    async def job_by_thread(self, thread_id: int) -> Job | None:
        """The job whose result message carries this thread (the earliest, if several)."""
        async with self._db.snapshot() as tx:
            row = await tx.fetchone(
                "SELECT * FROM jobs WHERE thread_id = ? ORDER BY id LIMIT 1", (thread_id,)
            )
        return job_from_row(row) if row else None

    async def recent_jobs(self, user_id: int, limit: int) -> list[Job]:
        async with self._db.snapshot() as tx:
            rows = await tx.fetchall(
                "SELECT * FROM jobs WHERE user_id = ? ORDER BY id DESC LIMIT ?", (user_id, limit)
            )
        return [job_from_row(row) for row in rows]

    # --- the worker side: claim, renew, settle (each write fenced by worker id and attempt) ---

    async def claim(
        self, worker_id: str, model: str, max_rows: int, *, lease_until: datetime, now: datetime
    ) -> list[Job]:
        """Take the next fair batch for ``model`` (none while another model is being served).

        Under the claim lock: the waiting rows and whose turn it is are read, ``FairQueue`` picks the
        batch (the same policy as in one process), and the rows become this worker's, one attempt more.
        """
        async with self._db.snapshot() as tx:
            # Idle workers look often: a look that finds nothing takes no lock.
            if await tx.fetchone("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1") is None:
                return []
        async with self._db.transaction() as tx:
            await tx.lock(CLAIM_LOCK)
            serving = await _setting(tx, MODEL_SETTING)
            if serving is not None and serving != model:
                return []
            rows = await tx.fetchall("SELECT * FROM jobs WHERE state = 'queued' ORDER BY id")
            if not rows:
                return []
            queue = FairQueue(*await _turns(tx))
            for row in rows:
                queue.push(job_from_row(row))
            picked = queue.next_batch(max_rows)
            claimed = []
            for job in picked:
                row = await tx.fetchone(
                    """
                    UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1, model = ?,
                                    worker_id = ?, lease_until = ?, progress_done = NULL,
                                    progress_total = NULL, turn = ?
                    WHERE id = ? AND state = 'queued' RETURNING *
                    """,
                    (to_db_time(now), model, worker_id, to_db_time(lease_until), queue.turn, job.id),
                )
                if row is not None:
                    claimed.append(job_from_row(row))
            for user_id in {job.user_id for job in picked}:
                await tx.execute(
                    """
                    INSERT INTO fair_turns (user_id, last_served) VALUES (?, ?)
                    ON CONFLICT (user_id) DO UPDATE SET last_served = excluded.last_served
                    """,
                    (user_id, queue.last_served(user_id)),
                )
            await tx.notify()
        return claimed

    async def renew(self, worker_id: str, *, lease_until: datetime, now: datetime) -> set[int]:
        """The worker is alive: its heartbeat and its jobs' leases move on; the ids still its own."""
        async with self._db.transaction() as tx:
            await tx.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", (to_db_time(now), worker_id))
            rows = await tx.fetchall(
                """
                UPDATE jobs SET lease_until = ? WHERE worker_id = ? AND state = 'running' RETURNING id
                """,
                (to_db_time(lease_until), worker_id),
            )
        return {int(row["id"]) for row in rows}

    async def running_ids(self, worker_id: str) -> set[int]:
        """The jobs running under this worker's claims now."""
        async with self._db.snapshot() as tx:
            rows = await tx.fetchall(
                "SELECT id FROM jobs WHERE worker_id = ? AND state = 'running'", (worker_id,)
            )
        return {int(row["id"]) for row in rows}

    async def set_progress(self, jobs: Sequence[Job], done: int, total: int) -> None:
        async with self._db.transaction() as tx:
            for job in jobs:
                await tx.execute(
                    f"UPDATE jobs SET progress_done = ?, progress_total = ? WHERE id = ? {_FENCE}",
                    (done, total, job.id, *_fence(job)),
                )
            await tx.notify()

    async def finish_job(
        self, job: Job, result: JobResult, model: str, tracks: Sequence[StoredTrack], now: datetime
    ) -> Job | None:
        """Store a claimed job's result and tracks; None when it is no longer this claim's (cancelled,
        or taken over after its lease ran out): then nothing is written."""
        async with self._db.transaction() as tx:
            row = await tx.fetchone(
                f"""
                UPDATE jobs SET state = 'done', finished_at = ?, model = ?, result_seconds = ?,
                                sample_rate = ?, seeds = ?, elapsed = ?, notes = ?, error = NULL,
                                lease_until = NULL
                WHERE id = ? {_FENCE} RETURNING *
                """,
                (
                    to_db_time(now),
                    model,
                    result.seconds,
                    result.sample_rate,
                    json.dumps(list(result.seeds)),
                    result.elapsed,
                    json.dumps(list(result.notes)),
                    job.id,
                    *_fence(job),
                ),
            )
            if row is None:
                return None
            await tx.executemany(
                """
                INSERT INTO tracks (job_id, idx, seed, sample_rate, samples, flac) VALUES (?, ?, ?, ?, ?, ?)
                """,
                [(job.id, t.index, t.seed, t.sample_rate, t.samples, t.flac) for t in tracks],
            )
            await tx.notify()
        return job_from_row(row)

    async def fail_job(self, job: Job | int, reason: str, now: datetime) -> Job | None:
        """An active job fails with ``reason`` (its seconds stop counting); None if it was not active.

        A ``Job`` from a claim is fenced: it fails only while it is still that claim's.
        """
        return await self._end_job(job, JobState.FAILED, reason, now)

    async def cancel_job(self, job: Job | int, now: datetime, *, only_waiting: bool = False) -> Job | None:
        return await self._end_job(job, JobState.CANCELLED, None, now, only_waiting=only_waiting)

    async def requeue(self, jobs: Iterable[Job], *, count_attempt: bool) -> None:
        """A worker's claimed jobs go back to waiting; a shutdown does not count as an attempt."""
        async with self._db.transaction() as tx:
            uncount = "" if count_attempt else f", attempts = {_ONE_LESS_ATTEMPT}"
            for job in jobs:
                await tx.execute(
                    f"""
                    UPDATE jobs SET state = 'queued', started_at = NULL, worker_id = NULL, lease_until = NULL,
                                    progress_done = NULL, progress_total = NULL {uncount}
                    WHERE id = ? {_FENCE}
                    """,
                    (job.id, *_fence(job)),
                )
            await tx.notify()

    async def reap(self, max_attempts: int, now: datetime) -> tuple[list[Job], list[Job]]:
        """Running jobs whose lease ran out (their worker died or hangs): they wait again, or fail
        once they used every attempt; (waiting again, failed)."""
        moment = to_db_time(now)
        async with self._db.transaction() as tx:
            failed = await tx.fetchall(
                """
                UPDATE jobs SET state = 'failed', finished_at = ?, error = ?, worker_id = NULL,
                                lease_until = NULL
                WHERE state = 'running' AND (lease_until IS NULL OR lease_until < ?) AND attempts >= ?
                RETURNING *
                """,
                (moment, _given_up(max_attempts), moment, max_attempts),
            )
            waiting = await tx.fetchall(
                """
                UPDATE jobs SET state = 'queued', started_at = NULL, worker_id = NULL, lease_until = NULL,
                                progress_done = NULL, progress_total = NULL
                WHERE state = 'running' AND (lease_until IS NULL OR lease_until < ?) RETURNING *
                """,
                (moment,),
            )
            if failed or waiting:
                await tx.notify()
        return [job_from_row(r) for r in waiting], [job_from_row(r) for r in failed]

    async def expire_all_workers(self, now: datetime) -> list[WorkerRow]:
        """Every worker still registered is gone (one bot per SQLite file, and it is starting): their
        leases end now. The workers that were registered."""
        workers = [worker for worker in await self.workers() if worker.stopped_at is None]
        for worker in workers:
            await self.expire_worker(worker.id, now, "its bot stopped")
        async with self._db.transaction() as tx:
            # Rows running under no worker: only a database written before workers had leases holds them.
            await tx.execute(
                "UPDATE jobs SET lease_until = ? WHERE state = 'running' AND worker_id IS NULL",
                (to_db_time(now - timedelta(microseconds=1)),),
            )
        return workers

    async def expire_worker(self, worker_id: str, now: datetime, error: str | None = None) -> None:
        """A worker known to be gone (its process ended): its leases end now, and it is marked stopped."""
        async with self._db.transaction() as tx:
            await tx.execute(
                "UPDATE jobs SET lease_until = ? WHERE worker_id = ? AND state = 'running'",
                (to_db_time(now - timedelta(microseconds=1)), worker_id),
            )
            await tx.execute(
                "UPDATE workers SET stopped_at = ?, last_error = coalesce(?, last_error) WHERE id = ?",
                (to_db_time(now), error, worker_id),
            )

    # --- workers and bots: who is alive ---

    async def register_worker(self, worker: WorkerRow) -> None:
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM workers WHERE id = ?", (worker.id,))
            await tx.execute(
                """
                INSERT INTO workers (id, host, pid, device, model, model_info, batch, started_at,
                                     heartbeat_at, stopped_at, last_error)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)
                """,
                (
                    worker.id,
                    worker.host,
                    worker.pid,
                    worker.device,
                    worker.model,
                    _info_json(worker.model_info),
                    None,
                    to_db_time(worker.started_at),
                    to_db_time(worker.heartbeat_at),
                ),
            )
            # Rows of workers that stopped long ago only clutter `musicbot status`.
            await tx.execute(
                "DELETE FROM workers WHERE stopped_at IS NOT NULL AND stopped_at < ?",
                (to_db_time(worker.started_at - FORGET_STOPPED),),
            )

    async def update_worker(self, worker_id: str, **fields: Any) -> None:
        """Set some of a worker's columns (any of ``_WORKER_COLUMNS``)."""
        values = []
        for name, value in fields.items():
            if name not in _WORKER_COLUMNS:
                raise ValueError(f"no worker column {name}")
            if name == "model_info":
                value = _info_json(value)
            elif name == "batch":
                value = None if value is None else json.dumps(sorted(value))
            elif isinstance(value, datetime):
                value = to_db_time(value)
            values.append(value)
        async with self._db.transaction() as tx:
            await tx.execute(
                f"UPDATE workers SET {', '.join(f'{name} = ?' for name in fields)} WHERE id = ?",
                (*values, worker_id),
            )
            await tx.notify()

    async def workers(self) -> list[WorkerRow]:
        async with self._db.snapshot() as tx:
            rows = await tx.fetchall("SELECT * FROM workers ORDER BY started_at, id")
        return [_worker_from_row(row) for row in rows]

    async def live_workers(self, lease: float) -> list[WorkerRow]:
        """Workers not stopped whose heartbeat is younger than ``lease`` seconds."""
        now = utc_now()
        return [
            worker
            for worker in await self.workers()
            if worker.stopped_at is None and (now - worker.heartbeat_at).total_seconds() <= lease
        ]

    async def register_bot(self, bot_id: str, host: str, pid: int, shards: str | None, now: datetime) -> None:
        async with self._db.transaction() as tx:
            await tx.execute(
                """
                INSERT INTO bots (id, host, pid, shards, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?)
                """,
                (bot_id, host, pid, shards, to_db_time(now), to_db_time(now)),
            )
            await tx.execute("DELETE FROM bots WHERE heartbeat_at < ?", (to_db_time(now - FORGET_STOPPED),))

    async def bot_alive(self, bot_id: str, now: datetime, *, stopped: bool = False) -> None:
        async with self._db.transaction() as tx:
            await tx.execute(
                "UPDATE bots SET heartbeat_at = ?, stopped_at = ? WHERE id = ?",
                (to_db_time(now), to_db_time(now) if stopped else None, bot_id),
            )

    async def adopt(self, bot_id: str, *, live_since: datetime | None) -> list[Job]:
        """Jobs whose bot is gone become this bot's to answer; the jobs adopted.

        With ``live_since`` None (one bot per database) every other bot is gone; else a bot is alive
        while its heartbeat is newer than ``live_since`` and it has not stopped.
        """
        orphaned = "owner_id IS NULL OR owner_id != ?"
        params: list[Any] = [bot_id, bot_id]
        if live_since is not None:
            orphaned = f"owner_id IS NULL OR (owner_id != ? AND owner_id NOT IN ({_LIVE_BOTS}))"
            params.append(to_db_time(live_since))
        async with self._db.transaction() as tx:
            rows = await tx.fetchall(
                f"""
                UPDATE jobs SET owner_id = ?
                WHERE ({orphaned})
                  AND (state IN ('queued', 'running')
                       OR (delivered_at IS NULL AND state IN ('done', 'failed')))
                RETURNING *
                """,
                (params[0], *params[1:]),
            )
        return sorted((job_from_row(row) for row in rows), key=lambda job: job.id)

    async def board(self, bot_id: str | None) -> Board:
        """One consistent read of what the bot shows: the active jobs (everyone's), this bot's
        outcomes not yet delivered, whose turn it is, the workers and the model served."""
        async with self._db.snapshot() as tx:
            rows = await tx.fetchall(
                """
                SELECT * FROM jobs
                WHERE state IN ('queued', 'running')
                   OR (owner_id = ? AND delivered_at IS NULL AND state IN ('done', 'failed', 'cancelled'))
                ORDER BY id
                """,
                (bot_id,),
            )
            last_served, turn = await _turns(tx)
            workers = await tx.fetchall("SELECT * FROM workers WHERE stopped_at IS NULL ORDER BY id")
            model = await _setting(tx, MODEL_SETTING)
            wanted = await _setting(tx, WANTED_MODEL_SETTING)
            speed = await _setting(tx, SPEED_SETTING.format(model=model)) if model else None
        return Board(
            jobs=[job_from_row(row) for row in rows],
            last_served=last_served,
            turn=turn,
            workers=[_worker_from_row(row) for row in workers],
            model=model,
            wanted_model=wanted,
            speed=_float_or_none(speed),
        )

    async def recent_failures(self, limit: int = 10) -> list[Job]:
        async with self._db.snapshot() as tx:
            rows = await tx.fetchall(
                "SELECT * FROM jobs WHERE state = 'failed' ORDER BY finished_at DESC, id DESC LIMIT ?",
                (limit,),
            )
        return [job_from_row(row) for row in rows]

    async def counts(self) -> dict[str, int]:
        """How many jobs are in each state."""
        async with self._db.snapshot() as tx:
            rows = await tx.fetchall("SELECT state, count(*) AS n FROM jobs GROUP BY state")
        return {row["state"]: int(row["n"]) for row in rows}

    async def update_delivery(
        self, job_id: int, fields: dict[str, Any], *, delivered_at: datetime | None
    ) -> Job:
        """Set delivery columns (names from ``_DELIVERY_COLUMNS`` only); delivering drops the token."""
        sets = [f"{_DELIVERY_COLUMNS[name]} = ?" for name in fields]
        params: list[Any] = list(fields.values())
        if delivered_at is not None:
            sets += ["delivered_at = ?", "interaction_token = NULL"]
            params.append(to_db_time(delivered_at))
        if not sets:
            return await self.job(job_id)
        async with self._db.transaction() as tx:
            row = await tx.fetchone(
                f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? RETURNING *", (*params, job_id)
            )
        if row is None:
            raise JobNotFound(job_id)
        return job_from_row(row)

    # --- audio ---

    async def tracks(self, job_id: int) -> list[StoredTrack]:
        async with self._db.snapshot() as tx:
            rows = await tx.fetchall(
                "SELECT * FROM tracks WHERE job_id = ? ORDER BY idx",
                (job_id,),
            )
        return [_track_from_row(row) for row in rows]

    async def track(self, ref: TrackRef) -> StoredTrack:
        async with self._db.snapshot() as tx:
            row = await tx.fetchone(
                "SELECT * FROM tracks WHERE job_id = ? AND idx = ?",
                (ref.job_id, ref.index),
            )
        if row is None:
            raise TrackNotFound(ref.job_id, ref.index)
        return _track_from_row(row)

    async def has_track(self, ref: TrackRef) -> bool:
        async with self._db.snapshot() as tx:
            row = await tx.fetchone(
                "SELECT 1 FROM tracks WHERE job_id = ? AND idx = ?", (ref.job_id, ref.index)
            )
        return row is not None

    async def melody(self, job_id: int) -> bytes | None:
        async with self._db.snapshot() as tx:
            row = await tx.fetchone(
                "SELECT flac FROM job_audio WHERE job_id = ? AND role = 'melody'", (job_id,)
            )
        return row["flac"] if row else None

    # --- limits ---

    async def limits(self, user_id: int | None) -> Limits:
        async with self._db.snapshot() as tx:
            return await self._effective_limits(tx, user_id)

    async def overrides(self) -> dict[int | None, LimitOverride]:
        """Every stored override: ``None`` is the default one."""
        async with self._db.snapshot() as tx:
            default = await tx.fetchone("SELECT * FROM default_limits WHERE id = 1")
            users = await tx.fetchall("SELECT * FROM user_limits ORDER BY user_id")
        found: dict[int | None, LimitOverride] = {}
        if default is not None:
            found[None] = _override_from_row(default)
        for row in users:
            found[row["user_id"]] = _override_from_row(row)
        return found

    async def set_override(self, user_id: int | None, change: LimitOverride, now: datetime) -> Limits:
        """Merge ``change`` into the stored override of a user (None: the defaults); the new limits."""
        async with self._db.transaction() as tx:
            current = await _stored_override(tx, user_id) or LimitOverride()
            merged = current.merged(change)
            values = (merged.max_queued, merged.daily_seconds, merged.max_duration, to_db_time(now))
            if user_id is None:
                await tx.execute("DELETE FROM default_limits")
                await tx.execute(
                    """
                    INSERT INTO default_limits
                        (id, max_queued, daily_seconds, max_duration, updated_at) VALUES (1, ?, ?, ?, ?)
                    """,
                    values,
                )
            else:
                await tx.execute("DELETE FROM user_limits WHERE user_id = ?", (user_id,))
                await tx.execute(
                    """
                    INSERT INTO user_limits
                        (user_id, max_queued, daily_seconds, max_duration, updated_at) VALUES (?, ?, ?, ?, ?)
                    """,
                    (user_id, *values),
                )
            return await self._effective_limits(tx, user_id)

    async def clear_override(self, user_id: int | None) -> Limits:
        async with self._db.transaction() as tx:
            if user_id is None:
                await tx.execute("DELETE FROM default_limits")
            else:
                await tx.execute("DELETE FROM user_limits WHERE user_id = ?", (user_id,))
            return await self._effective_limits(tx, user_id)

    async def usage(self, user_id: int, *, exempt: bool, now: datetime) -> Usage:
        async with self._db.snapshot() as tx:
            limits = await self._effective_limits(tx, user_id)
            active = await _active_jobs_of(tx, user_id)
            counted = await _counted_seconds(tx, user_id, now)
        return Usage(
            limits=limits,
            exempt=exempt,
            active_jobs=active,
            seconds_used=sum(seconds for _, seconds in counted),
            next_frees_at=counted[0][0] + DAILY_WINDOW if counted else None,
        )

    async def _check_limits(
        self, tx: Tx, user_id: int, duration: float, seconds: float, exempt: bool, now: datetime
    ) -> None:
        # Admins skip the per-user limits; their longest track is the server-wide one.
        limits = await self._effective_limits(tx, None if exempt else user_id)
        if duration > limits.max_duration + EPSILON:
            raise LimitExceeded.max_duration(limits.max_duration, duration)
        if not exempt:
            if await _active_jobs_of(tx, user_id) >= limits.max_queued:
                raise LimitExceeded.max_queued(limits.max_queued)
            counted = await _counted_seconds(tx, user_id, now)
            used = sum(s for _, s in counted)
            if used + seconds > limits.daily_seconds + EPSILON:
                frees_at = _daily_frees_at(counted, used + seconds - limits.daily_seconds)
                if seconds > limits.daily_seconds + EPSILON:
                    frees_at = None
                raise LimitExceeded.daily_seconds(limits.daily_seconds, used, seconds, frees_at)
        row = await tx.fetchone("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
        if row is not None and row[0] >= self._queue_size:
            raise QueueFull(self._queue_size)

    async def _effective_limits(self, tx: Tx, user_id: int | None) -> Limits:
        """Environment defaults, then the stored default override, then the user's own."""
        limits = self._defaults
        default = await _stored_override(tx, None)
        if default is not None:
            limits = default.apply(limits)
        if user_id is not None:
            own = await _stored_override(tx, user_id)
            if own is not None:
                limits = own.apply(limits)
        return limits

    # --- settings ---

    async def setting(self, key: str) -> str | None:
        async with self._db.snapshot() as tx:
            row = await tx.fetchone("SELECT value FROM settings WHERE key = ?", (key,))
        return row["value"] if row else None

    async def set_setting(self, key: str, value: str, now: datetime) -> None:
        async with self._db.transaction() as tx:
            await _put_setting(tx, key, value, now)

    async def want_model(self, model: str, now: datetime) -> None:
        """Ask the workers to serve ``model`` (after their running batches)."""
        async with self._db.transaction() as tx:
            await _put_setting(tx, WANTED_MODEL_SETTING, model, now)
            await tx.notify()

    async def serve_model(
        self, worker_id: str, model: str, info: ModelInfo, now: datetime, *, fallback: bool = False
    ) -> None:
        """A worker loaded ``model``: it is what is served from now on (``/model`` waits for this).

        ``fallback``: the stored choice did not load and this is the settings' model instead.
        """
        async with self._db.transaction() as tx:
            await tx.lock(CLAIM_LOCK)
            wanted = await _setting(tx, WANTED_MODEL_SETTING)
            # A worker that loaded what it found served while an admin asked for another model
            # changes nothing: it switches next.
            if wanted is None or wanted == model or fallback:
                await _put_setting(tx, MODEL_SETTING, model, now)
                await _put_setting(tx, WANTED_MODEL_SETTING, model, now)
            await tx.execute(
                "UPDATE workers SET model = ?, model_info = ?, last_error = NULL WHERE id = ?",
                (model, _info_json(info), worker_id),
            )
            await tx.notify()

    async def refuse_model(self, worker_id: str, model: str, error: str, now: datetime) -> None:
        """A worker could not load the wanted ``model``: the wish is withdrawn, with the reason."""
        async with self._db.transaction() as tx:
            await tx.lock(CLAIM_LOCK)
            wanted = await _setting(tx, WANTED_MODEL_SETTING)
            serving = await _setting(tx, MODEL_SETTING)
            if wanted == model and serving is not None and serving != model:
                await _put_setting(tx, WANTED_MODEL_SETTING, serving, now)
            await tx.execute(
                "UPDATE workers SET last_error = ? WHERE id = ?", (f"{model}: {error}", worker_id)
            )
            await tx.notify()

    async def _end_job(
        self,
        job: Job | int,
        state: JobState,
        reason: str | None,
        now: datetime,
        *,
        only_waiting: bool = False,
    ) -> Job | None:
        fence, params = ("", ()) if isinstance(job, int) else (_FENCE, _fence(job))
        job_id = job if isinstance(job, int) else job.id
        states = "('queued')" if only_waiting else "('queued', 'running')"
        async with self._db.transaction() as tx:
            row = await tx.fetchone(
                f"""
                UPDATE jobs SET state = ?, error = ?, finished_at = ?, lease_until = NULL
                WHERE id = ? AND state IN {states} {fence} RETURNING *
                """,
                (state.value, reason, to_db_time(now), job_id, *params),
            )
            if row is not None:
                await tx.notify()
        return job_from_row(row) if row else None


# Delivery fields the bot may set, mapped to their columns (never user text in SQL).
_DELIVERY_COLUMNS = {
    "status_message_id": "status_message_id",
    "result_message_id": "result_message_id",
    "thread_id": "thread_id",
}


def request_to_json(request: GenerationRequest) -> str:
    """The request without its audio (kept elsewhere), as JSON."""
    return json.dumps(
        {
            "prompt": request.prompt,
            "duration": request.duration,
            "variations": request.variations,
            "seed": request.seed,
            "loop": request.loop,
            "sampling": {
                "guidance": request.sampling.guidance,
                "temperature": request.sampling.temperature,
                "top_k": request.sampling.top_k,
                "top_p": request.sampling.top_p,
            },
        }
    )


def request_from_json(text: str) -> GenerationRequest:
    data = json.loads(text)
    return GenerationRequest(
        prompt=data["prompt"],
        duration=float(data["duration"]),
        variations=int(data["variations"]),
        seed=data["seed"],
        loop=bool(data["loop"]),
        sampling=SamplingParams(**data["sampling"]),
    )


def job_from_row(row: sqlite3.Row) -> Job:
    parent = TrackRef(row["parent_id"], row["parent_track"] or 0) if row["parent_id"] is not None else None
    result = None
    if row["state"] == "done" and row["sample_rate"] is not None:
        result = JobResult(
            seconds=row["result_seconds"],
            sample_rate=row["sample_rate"],
            seeds=tuple(json.loads(row["seeds"] or "[]")),
            elapsed=row["elapsed"],
            notes=tuple(json.loads(row["notes"] or "[]")),
        )
    return Job(
        id=row["id"],
        origin=Origin(row["user_id"], row["guild_id"], row["channel_id"]),
        kind=JobKind(row["kind"]),
        request=request_from_json(row["request"]),
        state=JobState(row["state"]),
        created_at=_time(row["created_at"]),
        parent=parent,
        has_melody=bool(row["has_melody"]),
        attempts=row["attempts"],
        started_at=from_db_time(row["started_at"]),
        finished_at=from_db_time(row["finished_at"]),
        model=row["model"],
        error=row["error"],
        result=result,
        delivery=Delivery(
            application_id=row["application_id"],
            interaction_token=row["interaction_token"],
            interaction_created_at=from_db_time(row["interaction_created_at"]),
            status_message_id=row["status_message_id"],
            result_message_id=row["result_message_id"],
            thread_id=row["thread_id"],
        ),
        delivered_at=from_db_time(row["delivered_at"]),
        worker_id=row["worker_id"],
        lease_until=from_db_time(row["lease_until"]),
        progress=(row["progress_done"], row["progress_total"]) if row["progress_total"] else None,
        owner_id=row["owner_id"],
    )


async def _check_parent(tx: Tx, kind: JobKind, parent: TrackRef) -> None:
    row = await tx.fetchone("SELECT id FROM jobs WHERE id = ?", (parent.job_id,))
    if row is None:
        raise JobNotFound(parent.job_id)
    if kind is JobKind.EXTEND:
        track = await tx.fetchone(
            "SELECT 1 FROM tracks WHERE job_id = ? AND idx = ?", (parent.job_id, parent.index)
        )
        if track is None:
            raise TrackNotFound(parent.job_id, parent.index)


async def _active_jobs_of(tx: Tx, user_id: int) -> int:
    row = await tx.fetchone(
        "SELECT count(*) FROM jobs WHERE user_id = ? AND state IN ('queued', 'running')", (user_id,)
    )
    return int(row[0]) if row else 0


async def _counted_seconds(tx: Tx, user_id: int, now: datetime) -> list[tuple[datetime, float]]:
    """(created, seconds) of the user's jobs that count in the 24 h window, oldest first."""
    rows = await tx.fetchall(
        f"""
        SELECT created_at, seconds FROM jobs
        WHERE user_id = ? AND created_at > ? AND state IN ({", ".join("?" * len(COUNTED_STATES))})
        ORDER BY created_at, id
        """,
        (user_id, to_db_time(now - DAILY_WINDOW), *COUNTED_STATES),
    )
    return [(_time(row["created_at"]), float(row["seconds"])) for row in rows]


def _daily_frees_at(counted: Sequence[tuple[datetime, float]], excess: float) -> datetime | None:
    """When enough of the counted seconds have left the window to fit ``excess`` more."""
    freed = 0.0
    for created, seconds in counted:
        freed += seconds
        if freed + EPSILON >= excess:
            return created + DAILY_WINDOW
    return None


async def _stored_override(tx: Tx, user_id: int | None) -> LimitOverride | None:
    if user_id is None:
        row = await tx.fetchone("SELECT * FROM default_limits WHERE id = 1")
    else:
        row = await tx.fetchone("SELECT * FROM user_limits WHERE user_id = ?", (user_id,))
    return _override_from_row(row) if row else None


def _pending_from_row(row: sqlite3.Row) -> PendingRequest:
    return PendingRequest(
        id=row["id"],
        origin=Origin(row["user_id"], row["guild_id"], row["channel_id"]),
        delivery=Delivery(
            application_id=row["application_id"],
            interaction_token=row["interaction_token"],
            interaction_created_at=from_db_time(row["interaction_created_at"]),
            status_message_id=row["status_message_id"],
        ),
    )


def _track_from_row(row: sqlite3.Row) -> StoredTrack:
    return StoredTrack(
        row["job_id"], row["idx"], row["seed"], row["sample_rate"], row["samples"], row["flac"]
    )


def _override_from_row(row: sqlite3.Row) -> LimitOverride:
    return LimitOverride(row["max_queued"], row["daily_seconds"], row["max_duration"])


def _time(text: str) -> datetime:
    moment = from_db_time(text)
    if moment is None:
        raise ValueError("a required timestamp is missing")
    return moment


def _time_or_none(moment: datetime | None) -> str | None:
    return to_db_time(moment) if moment is not None else None


def _given_up(attempts: int) -> str:
    return f"the bot stopped while making this, {attempts} times; it was given up, please ask again"


_ONE_LESS_ATTEMPT = "CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END"
# A claim's writes hold only while the job is still running under that worker and attempt.
_FENCE = "AND state = 'running' AND worker_id = ? AND attempts = ?"
# Bots alive at a moment (the parameter): heartbeat newer than it, not stopped.
_LIVE_BOTS = "SELECT id FROM bots WHERE stopped_at IS NULL AND heartbeat_at > ?"
_WORKER_COLUMNS = frozenset({"model", "model_info", "batch", "last_error", "stopped_at", "device"})
# Stopped workers and bots are listed for a day, then forgotten.
FORGET_STOPPED = timedelta(days=1)


def _fence(job: Job) -> tuple[str | None, int]:
    return (job.worker_id, job.attempts)


async def _setting(tx: Tx, key: str) -> str | None:
    row = await tx.fetchone("SELECT value FROM settings WHERE key = ?", (key,))
    return row["value"] if row else None


async def _put_setting(tx: Tx, key: str, value: str, now: datetime) -> None:
    await tx.execute(
        """
        INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?)
        ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at
        """,
        (key, value, to_db_time(now)),
    )


async def _turns(tx: Tx) -> tuple[dict[int, int], int]:
    """Whose turn it is: when each user was last served, and the latest turn."""
    rows = await tx.fetchall("SELECT user_id, last_served FROM fair_turns")
    served = {int(row["user_id"]): int(row["last_served"]) for row in rows}
    return served, max(served.values(), default=0)


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _info_json(info: ModelInfo | None) -> str | None:
    return None if info is None else json.dumps(dataclasses.asdict(info))


def _worker_from_row(row: Any) -> WorkerRow:
    info = json.loads(row["model_info"]) if row["model_info"] else None
    return WorkerRow(
        id=row["id"],
        host=row["host"],
        pid=int(row["pid"]),
        device=row["device"],
        model=row["model"],
        model_info=ModelInfo(**info) if info else None,
        batch=tuple(json.loads(row["batch"])) if row["batch"] else (),
        started_at=_time(row["started_at"]),
        heartbeat_at=_time(row["heartbeat_at"]),
        stopped_at=from_db_time(row["stopped_at"]),
        last_error=row["last_error"],
    )
