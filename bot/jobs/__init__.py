"""The job service: a fair queue in front of the one generation worker, per-user limits, and every
job in SQLite. It knows users and seconds; it reaches the model only through ``generation``."""

from bot.jobs.db import Database, DatabaseError, backup_database, open_database, sole_bot
from bot.jobs.errors import (
    BotError,
    InvalidLimit,
    JobFinished,
    JobNotFound,
    LimitExceeded,
    MelodyUnavailable,
    NotAllowed,
    QueueFull,
    ServiceClosed,
    TrackNotFound,
)
from bot.jobs.listener import BaseJobListener, JobListener
from bot.jobs.models import (
    INTERACTION_LIFETIME,
    Delivery,
    Job,
    JobKind,
    JobResult,
    JobState,
    JobTrack,
    LimitOverride,
    Origin,
    PendingRequest,
    QueueEntry,
    TrackRef,
    Usage,
)
from bot.jobs.service import JobService, WorkerFactory, utc_now

__all__ = [
    "INTERACTION_LIFETIME",
    "BaseJobListener",
    "BotError",
    "Database",
    "DatabaseError",
    "Delivery",
    "InvalidLimit",
    "Job",
    "JobFinished",
    "JobKind",
    "JobListener",
    "JobNotFound",
    "JobResult",
    "JobService",
    "JobState",
    "JobTrack",
    "LimitExceeded",
    "LimitOverride",
    "MelodyUnavailable",
    "NotAllowed",
    "Origin",
    "PendingRequest",
    "QueueEntry",
    "QueueFull",
    "ServiceClosed",
    "TrackNotFound",
    "TrackRef",
    "Usage",
    "WorkerFactory",
    "backup_database",
    "open_database",
    "sole_bot",
    "utc_now",
]
