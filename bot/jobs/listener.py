"""What the bot hears from the job service, and the order it hears it in."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from bot.jobs.models import Job, JobTrack, PendingRequest
from bot.jobs.tasks import BackgroundTasks

log = logging.getLogger(__name__)


class JobListener(Protocol):
    """Told about each job as it moves; calls for one job come in order, never two at once.

    A listener that delivers a result (or a failure) calls ``JobService.mark_delivered``; until it
    does, the outcome is handed to it again at the next start.
    """

    async def job_requeued(self, job: Job) -> None:
        """The job waits again after a restart."""

    async def job_started(self, job: Job) -> None: ...

    async def job_progress(self, job: Job, done: int, total: int) -> None:
        """Decoding steps done of ``total``; only the latest is passed on when the listener lags."""

    async def job_finished(self, job: Job, tracks: Sequence[JobTrack]) -> None: ...

    async def job_failed(self, job: Job, reason: str) -> None: ...

    async def job_cancelled(self, job: Job) -> None: ...

    async def request_interrupted(self, request: PendingRequest) -> None:
        """The bot stopped after acknowledging this command and before queueing or refusing it."""


class BaseJobListener:
    """A listener that ignores everything: subclass it and override what you need."""

    async def job_requeued(self, job: Job) -> None:
        return None

    async def job_started(self, job: Job) -> None:
        return None

    async def job_progress(self, job: Job, done: int, total: int) -> None:
        return None

    async def job_finished(self, job: Job, tracks: Sequence[JobTrack]) -> None:
        return None

    async def job_failed(self, job: Job, reason: str) -> None:
        return None

    async def job_cancelled(self, job: Job) -> None:
        return None

    async def request_interrupted(self, request: PendingRequest) -> None:
        return None


class Notifier:
    """Calls the listener off the dispatcher's path: one chain of calls per job, so order holds per job."""

    def __init__(self, tasks: BackgroundTasks) -> None:
        self.listener: JobListener = BaseJobListener()
        self._tasks = tasks
        self._chains: dict[int, asyncio.Task[None]] = {}
        self._progress: dict[int, tuple[Job, int, int]] = {}

    def requeued(self, job: Job) -> None:
        self._send(job.id, "requeued", lambda: self.listener.job_requeued(job))

    def started(self, job: Job) -> None:
        self._send(job.id, "started", lambda: self.listener.job_started(job))

    def progress(self, job: Job, done: int, total: int) -> None:
        pending = job.id in self._progress
        self._progress[job.id] = (job, done, total)
        if not pending:
            self._send(job.id, "progress", lambda: self._latest_progress(job.id))

    def finished(self, job: Job, tracks: Sequence[JobTrack]) -> None:
        self._send(job.id, "finished", lambda: self.listener.job_finished(job, tracks))

    def failed(self, job: Job, reason: str) -> None:
        self._send(job.id, "failed", lambda: self.listener.job_failed(job, reason))

    def cancelled(self, job: Job) -> None:
        self._send(job.id, "cancelled", lambda: self.listener.job_cancelled(job))

    def interrupted(self, request: PendingRequest) -> None:
        self._tasks.spawn(
            self.listener.request_interrupted(request), name=f"request-{request.id}-interrupted"
        )

    async def _latest_progress(self, job_id: int) -> None:
        job, done, total = self._progress.pop(job_id)
        await self.listener.job_progress(job, done, total)

    def _send(self, job_id: int, what: str, call: Callable[[], Awaitable[None]]) -> None:
        previous = self._chains.get(job_id)
        task = self._tasks.spawn(_after(previous, call), name=f"job-{job_id}-{what}")
        self._chains[job_id] = task
        task.add_done_callback(lambda done: self._forget(job_id, done))

    def _forget(self, job_id: int, task: asyncio.Task[None]) -> None:
        if self._chains.get(job_id) is task:
            del self._chains[job_id]


async def _after(previous: asyncio.Task[None] | None, call: Callable[[], Awaitable[None]]) -> None:
    if previous is not None:
        # Its failure is logged by its own task; this call goes ahead regardless.
        await asyncio.wait([previous])
    await call()
