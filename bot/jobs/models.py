"""The values the job service hands out: jobs, their tracks, queue entries and usage. All frozen."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from bot.settings import Limits
from generation import AudioClip, GenerationRequest

INTERACTION_LIFETIME = timedelta(minutes=15)


Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        """Waiting or running: the job still counts toward ``max_queued`` and the queue size."""
        return self in (JobState.QUEUED, JobState.RUNNING)


class JobKind(StrEnum):
    NEW = "new"
    VARIATIONS = "variations"
    EXTEND = "extend"
    REGENERATE = "regenerate"


@dataclass(frozen=True)
class Origin:
    """Who asked for a job, and where (``channel_id`` is the thread's id inside a thread)."""

    user_id: int
    guild_id: int | None = None
    channel_id: int | None = None


@dataclass(frozen=True)
class TrackRef:
    """One track of one job: ``index`` counts variations from 0."""

    job_id: int
    index: int = 0


@dataclass(frozen=True)
class Delivery:
    """What the bot needs to answer: the interaction (valid 15 minutes) and the messages it made."""

    application_id: int | None = None
    interaction_token: str | None = field(default=None, repr=False)
    interaction_created_at: datetime | None = None
    status_message_id: int | None = None
    result_message_id: int | None = None
    thread_id: int | None = None

    def interaction_usable(self, now: datetime, margin: timedelta = timedelta(seconds=30)) -> bool:
        """Whether the original reply can still be edited (else deliver to the channel)."""
        if self.interaction_token is None or self.interaction_created_at is None:
            return False
        return now < self.interaction_created_at + INTERACTION_LIFETIME - margin


@dataclass(frozen=True)
class PendingRequest:
    """A command the bot acknowledged but has not queued or refused yet (its id: the interaction's).

    Kept in the database for that short while, so that a crash in it is not silent: at the next start
    the user is told that nothing was made or counted, and to ask again.
    """

    id: int
    origin: Origin
    delivery: Delivery


@dataclass(frozen=True)
class JobResult:
    """What a finished job made: length of each track, rate, per-track seeds, compute time."""

    seconds: float
    sample_rate: int
    seeds: tuple[int, ...]
    elapsed: float
    notes: tuple[str, ...] = ()  # what the engine did that was not asked for, in words


@dataclass(frozen=True)
class Job:
    """One accepted request and everything known about it, as stored."""

    id: int
    origin: Origin
    kind: JobKind
    request: GenerationRequest
    state: JobState
    created_at: datetime
    parent: TrackRef | None = None
    has_melody: bool = False
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    model: str | None = None
    error: str | None = None
    result: JobResult | None = None
    delivery: Delivery = field(default_factory=Delivery)
    delivered_at: datetime | None = None
    # The worker running it (with ``attempts``, what fences that worker's writes) and its lease.
    worker_id: str | None = None
    lease_until: datetime | None = None
    # Decoding steps (done, total) as its worker last reported them.
    progress: tuple[int, int] | None = None
    # The bot process that answers its user.
    owner_id: str | None = None

    @property
    def user_id(self) -> int:
        return self.origin.user_id

    @property
    def seconds(self) -> float:
        """Audio seconds this job costs against the daily limit: duration × variations."""
        return job_seconds(self.request)

    @property
    def batchable(self) -> bool:
        """Jobs with audio input (a melody, a track to extend) are generated alone."""
        return not self.has_melody and self.kind is not JobKind.EXTEND


@dataclass(frozen=True, eq=False)
class JobTrack:
    """One finished track: the audio, and the FLAC bytes it is stored as."""

    job_id: int
    index: int
    seed: int
    audio: AudioClip
    flac: bytes = field(repr=False)

    @property
    def ref(self) -> TrackRef:
        return TrackRef(self.job_id, self.index)

    @property
    def seconds(self) -> float:
        return self.audio.seconds


@dataclass(frozen=True)
class QueueEntry:
    """A job in the queue: ``position`` 0 is running, 1 is next; estimates in seconds (None: unknown)."""

    job: Job
    position: int
    starts_in: float | None
    done_in: float | None


@dataclass(frozen=True)
class LimitOverride:
    """Limits an admin set for one user or as the default; None leaves a limit as it was."""

    max_queued: int | None = None
    daily_seconds: int | None = None
    max_duration: int | None = None

    def apply(self, base: Limits) -> Limits:
        return Limits(
            max_queued=base.max_queued if self.max_queued is None else self.max_queued,
            daily_seconds=base.daily_seconds if self.daily_seconds is None else self.daily_seconds,
            max_duration=base.max_duration if self.max_duration is None else self.max_duration,
        )

    def merged(self, newer: LimitOverride) -> LimitOverride:
        """This override with the values ``newer`` sets replacing these."""
        return LimitOverride(
            max_queued=self.max_queued if newer.max_queued is None else newer.max_queued,
            daily_seconds=self.daily_seconds if newer.daily_seconds is None else newer.daily_seconds,
            max_duration=self.max_duration if newer.max_duration is None else newer.max_duration,
        )

    @property
    def empty(self) -> bool:
        return self.max_queued is None and self.daily_seconds is None and self.max_duration is None


@dataclass(frozen=True)
class Usage:
    """A user's limits and what is used of them; ``exempt`` (admins) means no per-user limit holds."""

    limits: Limits
    exempt: bool
    active_jobs: int
    seconds_used: float
    next_frees_at: datetime | None

    @property
    def seconds_left(self) -> float:
        if self.exempt:
            return math.inf
        return max(0.0, self.limits.daily_seconds - self.seconds_used)


def job_seconds(request: GenerationRequest) -> float:
    return request.duration * request.variations
