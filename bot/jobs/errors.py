"""Errors of the job service: each carries its data and reads as a message a user can act on."""

from __future__ import annotations

from datetime import datetime


class BotError(Exception):
    """Root of every error the bot raises on purpose; ``str()`` is fit to show the user."""


class ServiceClosed(BotError):
    """The job service is shutting down (or not started) and takes no new work."""

    def __init__(self) -> None:
        super().__init__("the music queue is restarting; try again in a minute")


class LimitExceeded(BotError):
    """A request would go past a limit; ``limit`` names it, ``frees_at`` says when it allows more."""

    def __init__(
        self,
        limit: str,
        value: float,
        message: str,
        *,
        frees_at: datetime | None = None,
    ) -> None:
        super().__init__(message + (f"; it frees up at {_clock(frees_at)}" if frees_at else ""))
        self.limit = limit
        self.value = value
        self.frees_at = frees_at

    @classmethod
    def max_duration(cls, value: float, asked: float) -> LimitExceeded:
        return cls(
            "max_duration",
            value,
            f"the longest track you can ask for is {value:g} s (you asked for {asked:g} s)",
        )

    @classmethod
    def max_queued(cls, value: int, frees_at: datetime | None = None) -> LimitExceeded:
        return cls(
            "max_queued",
            value,
            f"you already have {value} job{'s' if value != 1 else ''} waiting or running, your limit"
            " (max_queued); wait until one of them is done",
            frees_at=frees_at,
        )

    @classmethod
    def daily_seconds(
        cls, value: float, used: float, asked: float, frees_at: datetime | None
    ) -> LimitExceeded:
        if asked > value:
            return cls(
                "daily_seconds",
                value,
                f"that is {asked:g} s of audio (duration × variations), more than your daily limit"
                f" (daily_seconds) of {value:g} s; ask for less",
            )
        left = max(0.0, value - used)
        return cls(
            "daily_seconds",
            value,
            f"that is {asked:g} s of audio but only {left:g} s are left of your {value:g} s per 24 hours"
            " (daily_seconds)",
            frees_at=frees_at,
        )


class QueueFull(LimitExceeded):
    """The whole queue holds as many jobs as it may (``queue_size``)."""

    def __init__(self, value: int) -> None:
        super().__init__(
            "queue_size", value, f"the queue is full ({value} jobs, queue_size); try again in a few minutes"
        )


class JobNotFound(BotError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"there is no job #{job_id}")
        self.job_id = job_id


class TrackNotFound(BotError):
    """A job has no stored track of that number (it failed, or it made fewer variations)."""

    def __init__(self, job_id: int, index: int) -> None:
        super().__init__(f"job #{job_id} has no track {index + 1}")
        self.job_id = job_id
        self.index = index


class NotAllowed(BotError):
    """The user may not do this to that job (only its owner or an admin may)."""


class JobFinished(BotError):
    """The job is no longer waiting or running, so it cannot be cancelled."""

    def __init__(self, job_id: int, state: str) -> None:
        super().__init__(f"job #{job_id} is already {state}")
        self.job_id = job_id
        self.state = state


class MelodyUnavailable(BotError):
    """The loaded model cannot follow a melody."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"the {model} model cannot follow a melody; an admin can switch to it with /model melody"
        )
        self.model = model


class InvalidLimit(BotError, ValueError):
    """A limit value an admin gave is out of range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _clock(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")
