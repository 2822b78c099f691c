"""``musicbot worker``: one generation worker process that serves the shared queue.

It owns one model on one device (``--device cuda:1``) and takes only the jobs of the model it has
loaded. Run one per GPU, on any machine that reaches the PostgreSQL database; ``musicbot run``
starts one beside itself (``--supervised``) for a SQLite file.

It tells a supervisor it is ready by printing ``ready MODEL`` on stdout. Supervised, it stops when
its supervisor's end of stdin closes (the bot is gone, however it ended). SIGTERM or Ctrl-C stops it
in order: the running batch is interrupted and its jobs wait again for another worker. A batch
that does not stop when its time is up ends the process (exit code 70): a stuck thread cannot be
killed, a process can, and its memory (the GPU's too) goes back with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import replace

from bot.jobs import DatabaseError, JobWorker, WorkerFactory, WorkerOptions, open_database
from bot.metrics import serve_metrics
from bot.settings import Settings

log = logging.getLogger(__name__)

EXIT_STUCK = 70
EXIT_ORPHANED = 71


class WorkerStartError(Exception):
    """The worker cannot start; the message says why."""


async def serve(
    settings: Settings,
    worker_factory: WorkerFactory,
    *,
    worker_id: str | None = None,
    supervised: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT (or, supervised, until stdin closes)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    if supervised:
        _exit_with_supervisor()
    try:
        async with open_database(settings.database) as db:
            metrics = None
            if settings.metrics_port is not None:
                metrics = serve_metrics(settings.metrics_port, db, settings)
            worker = JobWorker(
                db,
                settings,
                worker_factory,
                worker_id=worker_id,
                # SQLite cannot notify another process: a worker looks for jobs four times a second.
                options=WorkerOptions(
                    lease=settings.lease,
                    poll=min(1.0 if settings.shared_database else 0.25, settings.lease / 10),
                ),
                on_stuck=_exit_stuck,
                on_generated=metrics.observe_generation if metrics is not None else None,
            )
            try:
                try:
                    info = await worker.start()
                except Exception as exc:
                    raise WorkerStartError(f"the model could not be loaded: {exc}") from None
                print(f"ready {worker.model} {info.device} {info.dtype}", flush=True)
                try:
                    await stop.wait()
                finally:
                    log.info("worker %s stopping", worker.id)
                    await worker.close()
            finally:
                if metrics is not None:
                    metrics.close()
    except DatabaseError as exc:
        raise WorkerStartError(str(exc)) from None


def _exit_with_supervisor() -> None:
    """The supervisor holds the other end of stdin: end of file means it is gone. Then this worker
    ends at once, as if killed with it: the next bot on the database serves its jobs again.

    A daemon thread, so that a worker stopping in order never waits for this read.
    """

    def watch() -> None:
        sys.stdin.buffer.read()
        log.warning("the bot that started this worker is gone; the worker ends with it")
        logging.shutdown()
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def _exit_stuck() -> None:
    """A generation that ignores its cancel: end the process (the jobs were already failed)."""
    log.critical("a generation is stuck and cannot be stopped; the worker process ends to free its memory")
    logging.shutdown()
    os._exit(EXIT_STUCK)


def worker_settings(settings: Settings, device: str | None) -> Settings:
    return settings if device is None else replace(settings, device=device)
