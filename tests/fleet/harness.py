"""A fleet on one machine: bot processes (shards) and worker processes on one PostgreSQL database,
the bots on the Discord emulator, the workers with fake engines of a fixed cost per step.

Every part is a real process (``musicbot run`` and ``musicbot worker`` through their entry points),
started, signalled and killed by the test; only the model is fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.databases import query
from tests.discord_emulator import DiscordEmulator
from tests.reliability.harness import ROOT, Child, child_bot, child_env

READY_TIMEOUT = 60.0


@dataclass
class Worker:
    id: str
    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    log: bytearray = field(default_factory=bytearray)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def line(self, prefix: str, timeout: float = READY_TIMEOUT) -> str:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while True:
                found = next((line for line in self.lines if line.startswith(prefix)), None)
                if found is not None:
                    return found
                if self.process.returncode is not None:
                    raise AssertionError(
                        f"worker {self.id} ended: {self.log.decode(errors='replace')[-3000:]}"
                    )
                self.changed.clear()
                await self.changed.wait()


class Fleet:
    """Bots and workers on ``database`` (a PostgreSQL URL) around one emulator."""

    def __init__(
        self,
        emu: DiscordEmulator,
        database: str,
        cwd: Path,
        *,
        shards: int = 2,
        steps: int = 4,
        step_seconds: float = 0.0,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.emu = emu
        self.database = database
        self.cwd = cwd
        self.shards = shards
        self.steps = steps
        self.step_seconds = step_seconds
        self.settings = {"MUSICBOT_WORKERS": "0", "MUSICBOT_LEASE": "2", **(settings or {})}
        self.workers: list[Worker] = []
        self._readers: list[asyncio.Task[None]] = []

    def env(self, **extra: str) -> dict[str, str]:
        return child_env(self.emu, self.database, **self.settings, **extra)  # type: ignore[arg-type]

    @asynccontextmanager
    async def bot(self, shard: int, *args: str) -> AsyncIterator[Child]:
        env = self.env(MUSICBOT_SHARD_COUNT=str(self.shards), MUSICBOT_SHARD_IDS=str(shard))
        async with child_bot(self.emu, env, *args, cwd=self.cwd) as child:
            await self.emu.wait_for(lambda: shard in self.emu.shards, timeout=30)
            yield child

    async def start_worker(self, name: str, *args: str) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.reliability.bot_process",
            "worker",
            "--id",
            name,
            "--steps",
            str(self.steps),
            "--step-seconds",
            str(self.step_seconds),
            *args,
            cwd=self.cwd,
            env={**self.env(), "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        worker = Worker(name, process)
        self.workers.append(worker)
        self._readers += [
            asyncio.create_task(self._read(worker, stdout=True)),
            asyncio.create_task(self._read(worker, stdout=False)),
        ]
        await worker.line("ready")
        return worker

    async def _read(self, worker: Worker, *, stdout: bool) -> None:
        stream = worker.process.stdout if stdout else worker.process.stderr
        assert stream is not None
        async for raw in stream:
            if stdout:
                worker.lines.append(raw.decode().rstrip("\n"))
            else:
                worker.log += raw
            worker.changed.set()

    async def close(self) -> None:
        for worker in self.workers:
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                await asyncio.wait_for(worker.process.wait(), 20)
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()
        for reader in self._readers:
            reader.cancel()

    async def all_delivered(self, expected: int, timeout: float = 120.0) -> float:  # noqa: ASYNC109
        """Until ``expected`` jobs are finished and delivered; the seconds it took."""
        began = time.monotonic()
        async with asyncio.timeout(timeout):
            while True:
                [(done,)] = await query(
                    self.database,
                    "SELECT count(*) FROM jobs"
                    " WHERE delivered_at IS NOT NULL AND state IN ('done', 'failed')",
                )
                if done >= expected:
                    return time.monotonic() - began
                await asyncio.sleep(0.1)

    def results_per_prompt(self) -> Counter[str]:
        """How many distinct messages carry each prompt's result (its audio): a user sees these."""
        found: Counter[str] = Counter()
        for message in self.emu.messages.values():
            if message.deleted or not message.attachments:
                continue
            content = message.content
            start, end = content.find("“"), content.find("”")
            if start >= 0 and end > start:
                found[content[start + 1 : end]] += 1
        return found


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(share * len(values)))]
