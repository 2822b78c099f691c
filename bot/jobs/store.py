"""Jobs, tracks, limits and settings in SQLite: the source of truth the service's queue caches.

Limits are never counters: every check is derived from the job rows inside the same
``BEGIN IMMEDIATE`` transaction that inserts the new job, so two requests cannot both slip past one.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from bot.jobs.db import Database, Tx, from_db_time, to_db_time
from bot.jobs.errors import JobNotFound, LimitExceeded, QueueFull, TrackNotFound
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
)
from bot.settings import Limits
from generation import GenerationRequest, SamplingParams

DAILY_WINDOW = timedelta(hours=24)
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


@dataclass(frozen=True)
class StoredTrack:
    job_id: int
    index: int
    seed: int
    sample_rate: int
    samples: int
    flac: bytes = field(repr=False)


class JobStore:
    """SQL for jobs and limits; ``defaults`` are the limits from the environment."""

    def __init__(self, db: Database, defaults: Limits, queue_size: int) -> None:
        self._db = db
        self._defaults = defaults
        self._queue_size = queue_size

    # --- jobs ---

    async def add_job(self, new: NewJob, *, exempt: bool, now: datetime) -> Job:
        """Check every limit against the rows and insert the job, in one transaction."""
        seconds = job_seconds(new.request)
        async with self._db.transaction() as tx:
            if new.parent is not None:
                await _check_parent(tx, new.kind, new.parent)
            await self._check_limits(tx, new.origin.user_id, new.request.duration, seconds, exempt, now)
            row = await tx.fetchone(
                """
                INSERT INTO jobs (user_id, guild_id, channel_id, kind, parent_id, parent_track, request,
                                  seconds, has_melody, created_at, application_id, interaction_token,
                                  interaction_created_at, status_message_id, result_message_id, thread_id)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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
                    new.melody_flac is not None,
                    to_db_time(now),
                    new.delivery.application_id,
                    new.delivery.interaction_token,
                    _time_or_none(new.delivery.interaction_created_at),
                    new.delivery.status_message_id,
                    new.delivery.result_message_id,
                    new.delivery.thread_id,
                ),
            )
            if row is None:
                raise RuntimeError("INSERT ... RETURNING gave no row")
            if new.melody_flac is not None:
                await tx.execute(
                    "INSERT INTO job_audio (job_id, role, flac) VALUES (?, 'melody', ?)",
                    (row["id"], new.melody_flac),
                )
            if new.pending_id is not None:
                await tx.execute("DELETE FROM pending_requests WHERE id = ?", (new.pending_id,))
        return job_from_row(row)

    # --- requests acknowledged but not queued yet ---

    async def add_pending(self, request: PendingRequest, now: datetime) -> None:
        delivery = request.delivery
        async with self._db.transaction() as tx:
            await tx.execute(
                """
                INSERT OR REPLACE INTO pending_requests
                    (id, user_id, guild_id, channel_id, application_id, interaction_token,
                     interaction_created_at, status_message_id, created_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
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
                ),
            )

    async def drop_pending(self, request_id: int) -> None:
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM pending_requests WHERE id = ?", (request_id,))

    async def take_pending(self) -> list[PendingRequest]:
        """Every pending request, removed: each is told about once, at the start after a crash."""
        async with self._db.transaction() as tx:
            rows = await tx.fetchall("DELETE FROM pending_requests RETURNING *")
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

    async def mark_running(self, job_ids: Sequence[int], model: str | None, now: datetime) -> list[Job]:
        """Waiting jobs become running (one more attempt); the ones no longer waiting are left out."""
        async with self._db.transaction() as tx:
            rows = [
                await tx.fetchone(
                    """
                    UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1, model = ?
                    WHERE id = ? AND state = 'queued' RETURNING *
                    """,
                    (to_db_time(now), model, job_id),
                )
                for job_id in job_ids
            ]
        return [job_from_row(row) for row in rows if row is not None]

    async def finish_job(
        self, job_id: int, result: JobResult, model: str, tracks: Sequence[StoredTrack], now: datetime
    ) -> Job | None:
        """Store a running job's result and tracks; None when it was cancelled meanwhile."""
        async with self._db.transaction() as tx:
            row = await tx.fetchone(
                """
                UPDATE jobs SET state = 'done', finished_at = ?, model = ?, result_seconds = ?,
                                sample_rate = ?, seeds = ?, elapsed = ?, error = NULL
                WHERE id = ? AND state = 'running' RETURNING *
                """,
                (
                    to_db_time(now),
                    model,
                    result.seconds,
                    result.sample_rate,
                    json.dumps(list(result.seeds)),
                    result.elapsed,
                    job_id,
                ),
            )
            if row is None:
                return None
            await tx.executemany(
                """
                INSERT INTO tracks (job_id, idx, seed, sample_rate, samples, flac) VALUES (?, ?, ?, ?, ?, ?)
                """,
                [(job_id, t.index, t.seed, t.sample_rate, t.samples, t.flac) for t in tracks],
            )
        return job_from_row(row)

    async def fail_job(self, job_id: int, reason: str, now: datetime) -> Job | None:
        """An active job fails with ``reason`` (its seconds stop counting); None if it was not active."""
        return await self._end_job(job_id, JobState.FAILED, reason, now)

    async def cancel_job(self, job_id: int, now: datetime) -> Job | None:
        return await self._end_job(job_id, JobState.CANCELLED, None, now)

    async def requeue(self, job_ids: Iterable[int], *, count_attempt: bool) -> None:
        """Running jobs go back to waiting; a shutdown does not count as an attempt."""
        async with self._db.transaction() as tx:
            await tx.executemany(
                f"""
                UPDATE jobs SET state = 'queued', started_at = NULL
                    {"" if count_attempt else ", attempts = max(attempts - 1, 0)"}
                WHERE id = ? AND state = 'running'
                """,
                [(job_id,) for job_id in job_ids],
            )

    async def recover(self, max_attempts: int, now: datetime) -> tuple[list[Job], list[Job]]:
        """After a stop: running jobs wait again unless they used every attempt; (waiting, failed)."""
        async with self._db.transaction() as tx:
            stuck = await tx.fetchall(
                "SELECT id, attempts FROM jobs WHERE state = 'running' AND attempts >= ?", (max_attempts,)
            )
            failed = [
                await tx.fetchone(
                    """
                    UPDATE jobs SET state = 'failed', finished_at = ?, error = ?
                    WHERE id = ? RETURNING *
                    """,
                    (to_db_time(now), _given_up(row["attempts"]), row["id"]),
                )
                for row in stuck
            ]
            await tx.execute("UPDATE jobs SET state = 'queued', started_at = NULL WHERE state = 'running'")
            waiting = await tx.fetchall("SELECT * FROM jobs WHERE state = 'queued' ORDER BY id")
        return [job_from_row(r) for r in waiting], [job_from_row(r) for r in failed if r is not None]

    async def undelivered(self) -> list[Job]:
        """Finished or failed jobs whose outcome the bot has not confirmed delivering."""
        async with self._db.snapshot() as tx:
            rows = await tx.fetchall(
                """
                SELECT * FROM jobs WHERE delivered_at IS NULL AND state IN ('done', 'failed') ORDER BY id
                """
            )
        return [job_from_row(row) for row in rows]

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
                await tx.execute(
                    """
                    INSERT OR REPLACE INTO default_limits
                        (id, max_queued, daily_seconds, max_duration, updated_at) VALUES (1, ?, ?, ?, ?)
                    """,
                    values,
                )
            else:
                await tx.execute(
                    """
                    INSERT OR REPLACE INTO user_limits
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
            await tx.execute(
                "INSERT OR REPLACE INTO settings (key, value, updated_at) VALUES (?, ?, ?)",
                (key, value, to_db_time(now)),
            )

    async def _end_job(self, job_id: int, state: JobState, reason: str | None, now: datetime) -> Job | None:
        async with self._db.transaction() as tx:
            row = await tx.fetchone(
                """
                UPDATE jobs SET state = ?, error = ?, finished_at = ?
                WHERE id = ? AND state IN ('queued', 'running') RETURNING *
                """,
                (state.value, reason, to_db_time(now), job_id),
            )
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
