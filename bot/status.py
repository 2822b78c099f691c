"""``musicbot status``: the fleet as the shared store sees it, for the operator."""

from __future__ import annotations

import asyncio
from datetime import datetime

from bot.jobs import DatabaseError, Job, JobState, open_database, utc_now
from bot.jobs.fairqueue import FairQueue
from bot.jobs.pgdb import redact
from bot.jobs.store import Board, JobStore, WorkerRow
from bot.settings import Settings

FAILURES_SHOWN = 5


async def fleet_status(settings: Settings, *, now: datetime | None = None) -> str:
    if not settings.shared_database and not await asyncio.to_thread(settings.db_path.is_file):
        raise DatabaseError(
            f"there is no database at {settings.db_path} (set MUSICBOT_DB, or run from its directory)"
        )
    async with open_database(settings.database, checkpoint_every=None) as db:
        store = JobStore(db, settings.limits, settings.queue_size)
        board = await store.board(None)
        workers = await store.workers()
        failures = await store.recent_failures(FAILURES_SHOWN)
    return render_status(settings, board, workers, failures, now or utc_now())


def render_status(
    settings: Settings, board: Board, workers: list[WorkerRow], failures: list[Job], now: datetime
) -> str:
    lease = settings.lease
    live = [w for w in workers if w.stopped_at is None and (now - w.heartbeat_at).total_seconds() <= lease]
    silent = [w for w in workers if w.stopped_at is None and w not in live]
    lines = [f"database: {redact(settings.database)}", f"model served: {board.model or settings.model}"]
    if board.wanted_model and board.wanted_model != board.model:
        lines.append(f"model asked for: {board.wanted_model} (the workers load it after their batches)")
    lines.append(f"workers: {len(live)} alive" + (f", {len(silent)} not answering" if silent else ""))
    for worker in [*live, *silent]:
        lines.append("  " + _worker_line(worker, now, lease))
    running = [job for job in board.jobs if job.state is JobState.RUNNING]
    queue = FairQueue(board.last_served, board.turn)
    for job in board.jobs:
        if job.state is JobState.QUEUED:
            queue.push(job)
    waiting = queue.order()
    speed = f"; {board.speed:.2f} compute s per audio s" if board.speed is not None else ""
    lines.append(f"queue: {len(running)} running, {len(waiting)} waiting{speed}")
    for job in running:
        progress = f", {100 * job.progress[0] / job.progress[1]:.0f}%" if job.progress else ""
        lines.append(f"  #{job.id} running on {job.worker_id}{progress}: {_job_text(job)}")
    for position, job in enumerate(waiting, start=1):
        lines.append(f"  #{job.id} waiting ({position}): {_job_text(job)}")
    lines.append(f"recent failures: {len(failures) or 'none'}")
    for job in failures:
        when = job.finished_at.strftime("%Y-%m-%d %H:%M:%S") if job.finished_at else "?"
        lines.append(f"  #{job.id} {when} user {job.user_id}: {job.error}")
    return "\n".join(lines)


def _worker_line(worker: WorkerRow, now: datetime, lease: float) -> str:
    ago = (now - worker.heartbeat_at).total_seconds()
    batch = f"batch {', '.join(f'#{i}' for i in worker.batch)}" if worker.batch else "idle"
    answering = "" if ago <= lease else " (NOT ANSWERING)"
    error = f"; last error: {worker.last_error}" if worker.last_error else ""
    return (
        f"{worker.id} on {worker.host} (pid {worker.pid}), {worker.device}, model {worker.model or '-'},"
        f" {batch}, heartbeat {ago:.1f} s ago{answering}{error}"
    )


def _job_text(job: Job) -> str:
    prompt = job.request.prompt if len(job.request.prompt) <= 40 else job.request.prompt[:39] + "…"
    variations = f" x{job.request.variations}" if job.request.variations > 1 else ""
    return f"user {job.user_id}, {job.request.duration:g} s{variations}, “{prompt}”"
