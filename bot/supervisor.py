"""The worker processes that ``musicbot run`` starts beside itself, and keeps alive.

Each worker is a ``musicbot worker --supervised`` child. Nothing crosses to it but the database:
jobs go in as rows, audio comes back as rows. A worker that exits (a crash, a segfault, the kernel's
OOM killer, or a stuck generation that ends its own process) is replaced; its jobs' leases end at
once, so they are served again (or failed, after their last attempt) without waiting for the lease.
A worker whose heartbeat stops (a native call that never returns, holding the interpreter) is
killed with SIGKILL and replaced. Its memory, the GPU's included, goes back with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.jobs.db import JobsDatabase
from bot.jobs.models import utc_now
from bot.jobs.store import JobStore
from bot.jobs.worker import WorkerOptions, new_id
from bot.settings import Settings, child_environment

log = logging.getLogger(__name__)

# The first start may download a model: it gets this long to say it is ready.
READY_TIMEOUT = 1800.0
# A worker that keeps dying is restarted after a pause that doubles up to this.
MAX_BACKOFF = 60.0
STOP_TIMEOUT = 20.0

Command = Callable[[str], Sequence[str]]


class WorkerStartFailed(Exception):
    """A worker process could not start (its model did not load, say); the message is its own."""


def worker_command(verbose: bool = False) -> Command:
    """``musicbot worker --supervised --id ID`` with this interpreter."""

    def command(worker_id: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bot",
            *(["-v"] if verbose else []),
            "worker",
            "--supervised",
            "--id",
            worker_id,
        ]

    return command


@dataclass(eq=False)
class _Child:
    id: str
    process: asyncio.subprocess.Process
    started: float = field(default_factory=time.monotonic)
    ready: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    stderr_tail: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)


class LocalWorkers:
    """Starts ``count`` worker processes and supervises them until closed."""

    def __init__(
        self,
        db: JobsDatabase,
        settings: Settings,
        count: int,
        *,
        command: Command | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self._store = JobStore(db, settings.limits, settings.queue_size)
        self._settings = settings
        self._count = count
        self._command = command or worker_command()
        self._env = child_environment({**(env or {}), "MUSICBOT_DB": settings.database})
        self._ready_timeout = ready_timeout
        self._children: dict[int, _Child] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def start(self) -> None:
        """Start every worker and wait until each is ready; ``WorkerStartFailed`` if one cannot start."""
        for slot in range(self._count):
            child = await self._spawn(slot)
            await self._wait_ready(child)
        for slot in range(self._count):
            self._tasks.append(asyncio.create_task(self._supervise(slot), name=f"worker-slot-{slot}"))
        self._tasks.append(asyncio.create_task(self._watch_heartbeats(), name="worker-heartbeats"))

    async def close(self) -> None:
        """Stop the workers in order (SIGTERM: their running jobs wait again); SIGKILL after a while."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        children = list(self._children.values())
        for child in children:
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        for child in children:
            try:
                await asyncio.wait_for(child.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.error("worker %s did not stop within %g s; killing it", child.id, STOP_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
            if child.process.stdin is not None:
                child.process.stdin.close()

    # --- children ---

    async def _spawn(self, slot: int) -> _Child:
        worker_id = new_id(f"worker{slot}")
        process = await asyncio.create_subprocess_exec(
            *self._command(worker_id),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
        )
        child = _Child(worker_id, process)
        self._children[slot] = child
        child.readers = [
            asyncio.create_task(self._read_stdout(child), name=f"{worker_id}-stdout"),
            asyncio.create_task(self._read_stderr(child), name=f"{worker_id}-stderr"),
        ]
        log.info("started worker process %d (%s)", process.pid, worker_id)
        return child

    async def _wait_ready(self, child: _Child) -> None:
        exited = asyncio.ensure_future(child.process.wait())
        either: list[asyncio.Future[Any]] = [child.ready, exited]
        try:
            done, _ = await asyncio.wait(
                either, timeout=self._ready_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not exited.done():
                exited.cancel()
        if child.ready.done():
            log.info("worker %s is ready: %s", child.id, child.ready.result())
            return
        if not done:
            child.process.kill()
            raise WorkerStartFailed(f"the worker did not get ready within {self._ready_timeout:.0f} s")
        await asyncio.sleep(0.05)  # the last lines of stderr
        raise WorkerStartFailed(_why(child))

    async def _read_stdout(self, child: _Child) -> None:
        assert child.process.stdout is not None
        async for line in child.process.stdout:
            text = line.decode(errors="replace").strip()
            if text.startswith("ready") and not child.ready.done():
                child.ready.set_result(text.removeprefix("ready").strip())
            else:
                print(text, flush=True)

    async def _read_stderr(self, child: _Child) -> None:
        """The child's log goes on to ours (stderr); its last lines say why it stopped."""
        assert child.process.stderr is not None
        async for line in child.process.stderr:
            text = line.decode(errors="replace").rstrip()
            sys.stderr.write(text + "\n")
            child.stderr_tail = [*child.stderr_tail[-19:], text]

    async def _supervise(self, slot: int) -> None:
        backoff = 1.0
        while not self._closing:
            child = self._children[slot]
            code = await child.process.wait()
            if self._closing:
                return
            reason = _exit_reason(code)
            log.error("worker process %d (%s) %s; starting a new one", child.process.pid, child.id, reason)
            # Its jobs are served again (or failed, after their last attempt) now, not after the lease.
            try:
                await self._store.expire_worker(child.id, utc_now(), f"the process {reason}")
                await self._store.reap(WorkerOptions().max_attempts, utc_now())
            except Exception as exc:
                log.warning("could not end the leases of worker %s: %s", child.id, exc)
            if time.monotonic() - child.started > 5 * MAX_BACKOFF:
                backoff = 1.0
            await asyncio.sleep(backoff)
            backoff = min(MAX_BACKOFF, backoff * 2)
            try:
                fresh = await self._spawn(slot)
                await self._wait_ready(fresh)
            except WorkerStartFailed as exc:
                log.error("the new worker could not start: %s", exc)
            except Exception:
                log.exception("starting a new worker failed")
                await asyncio.sleep(backoff)

    async def _watch_heartbeats(self) -> None:
        """SIGKILL a worker whose heartbeat is older than its lease (its event loop is stuck)."""
        lease = self._settings.lease
        while True:
            await asyncio.sleep(lease / 3)
            try:
                rows = {row.id: row for row in await self._store.workers()}
            except Exception as exc:
                log.warning("could not read the workers' heartbeats: %s", exc)
                continue
            now = utc_now()
            for child in list(self._children.values()):
                row = rows.get(child.id)
                if row is None or row.stopped_at is not None or child.process.returncode is not None:
                    continue
                if not child.ready.done():  # loading its model: no heartbeats yet
                    continue
                silent = (now - row.heartbeat_at).total_seconds()
                if silent > lease:
                    log.error("worker %s has not answered for %.0f s; killing it", child.id, silent)
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()


async def end_orphans(db: JobsDatabase, settings: Settings) -> None:
    """Workers an earlier bot on this SQLite file started and that still run here are killed.

    They end by themselves when their bot is gone (end of stdin); this covers the moment between. A
    process is only killed when its command line names that worker, so a reused pid is left alone.
    """
    store = JobStore(db, settings.limits, settings.queue_size)
    host = socket.gethostname()
    for worker in await store.workers():
        if worker.stopped_at is not None or worker.host != host or worker.pid == os.getpid():
            continue
        try:
            command = (await asyncio.to_thread(Path(f"/proc/{worker.pid}/cmdline").read_bytes)).split(b"\0")
        except OSError:
            continue
        if worker.id.encode() in command:
            log.warning("stopping worker %s (pid %d), left by an earlier bot", worker.id, worker.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    if code == 70:
        return "ended because a generation was stuck"
    return f"exited with code {code}"


def _why(child: _Child) -> str:
    for line in reversed(child.stderr_tail):
        if line.startswith("musicbot: "):
            return line.removeprefix("musicbot: ")
    code = child.process.returncode
    return f"the worker process {_exit_reason(code) if code is not None else 'stopped'}"
