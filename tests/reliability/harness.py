"""Shared by the reliability tests: faulty fake engines, a bot in this process with its service options,
a watch on the event loop, ``musicbot run`` in a child process, and crafted interactions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.settings import Settings
from generation import (
    GenerationError,
    GenerationRequest,
    GenerationResult,
    GenerationWorker,
)
from tests.bot.harness import Running, fake_settings, running_bot, wait_reply
from tests.discord_emulator import (
    INTERACTION_APPLICATION_COMMAND,
    DiscordEmulator,
    EmulatedInteraction,
    EmuUser,
    StoredMessage,
    Upload,
)
from tests.jobs.fakes import FakeEngine, FakeModels

ROOT = Path(__file__).resolve().parents[2]
HANG_PROMPT = "hangs forever"
MEMORY_PROMPT = "eats all memory"
FAIL_MARK = "[fail]"  # any prompt with this in it fails with an error message
CHILD_TIMEOUT = 30.0


# --- engines that fail in the ways a real one can ---


@dataclass
class FaultyModels(FakeModels):
    """FakeModels whose engines can also hang (deaf to cancel) or run out of host memory."""

    unstick: threading.Event = field(default_factory=threading.Event)
    hung: threading.Event = field(default_factory=threading.Event)
    closed: list[str] = field(default_factory=list)

    def _engine(self, source: str) -> FaultyEngine:
        return FaultyEngine(self, source)


class FaultyEngine(FakeEngine):
    def __init__(self, models: FaultyModels, source: str) -> None:
        super().__init__(models, source)
        self._faulty = models

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[GenerationResult]:
        prompts = {request.prompt for request in requests}
        if any(FAIL_MARK in prompt for prompt in prompts):
            raise GenerationError("the fake engine was told to fail")
        if MEMORY_PROMPT in prompts:
            raise MemoryError()
        if HANG_PROMPT in prompts:
            # A deadlock in a CUDA kernel or a C library: deaf to the cancel event.
            self._faulty.hung.set()
            self._faulty.unstick.wait()
            raise RuntimeError("a stuck call came back long after it was given up")
        return super().generate(requests, progress, cancel)

    def close(self) -> None:
        self._faulty.closed.append(self.info.name)


# --- a bot in this process ---


settings_for = fake_settings


@asynccontextmanager
async def bot_running(
    emu: DiscordEmulator,
    settings: Settings,
    models: FakeModels,
    *,
    close_timeout: float = 10.0,
    cancel_grace: float = 10.0,
    checkpoint_every: float | None = None,
    **bot_options: Any,
) -> AsyncIterator[Running]:
    """The bot as ``musicbot run`` builds it, with the service's timeouts at hand."""
    async with running_bot(
        emu,
        settings,
        lambda: GenerationWorker(models),
        checkpoint_every=checkpoint_every,
        service_options={"close_timeout": close_timeout, "cancel_grace": cancel_grace},
        **bot_options,
    ) as running:
        yield running


async def answered(
    emu: DiscordEmulator,
    interaction: EmulatedInteraction,
    done: Callable[[StoredMessage], bool] = lambda m: bool(m.content),
    timeout: float = 10.0,  # noqa: ASYNC109
) -> StoredMessage:
    """The interaction's reply once ``done`` holds for it (default: it says something)."""
    return await wait_reply(emu, interaction, done, timeout)


def rows(db_path: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Read the database file as another program would (a second connection)."""
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        return list(conn.execute(sql, params))


def wal_bytes(db_path: Path) -> int:
    """Size of the database's write-ahead log (0: absent or empty, i.e. all in the database file)."""
    wal = Path(f"{db_path}-wal")
    return wal.stat().st_size if wal.exists() else 0


def file_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- the event loop ---


class LoopWatch:
    """How late the event loop wakes a task that sleeps ``tick`` at a time: its longest stall."""

    def __init__(self, tick: float = 0.005) -> None:
        self.tick = tick
        self.max_gap = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.create_task(self._watch(), name="loop-watch")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.tick)
            now = loop.time()
            self.max_gap = max(self.max_gap, now - last - self.tick)
            last = now


# --- crafted interactions ---


async def crafted(
    emu: DiscordEmulator,
    name: str,
    options: Sequence[dict[str, Any]],
    *,
    user: EmuUser | None = None,
    resolved: dict[str, Any] | None = None,
) -> EmulatedInteraction:
    """A slash command as a modified client can send it: any option types, values and attachments,
    and no check of ``default_member_permissions``."""
    command = next(c for c in emu.synced_commands(emu.guild_id) if c["name"] == name)
    data: dict[str, Any] = {
        "id": command["id"],
        "name": name,
        "type": 1,
        "options": list(options),
        "guild_id": str(emu.guild_id),
    }
    if resolved is not None:
        data["resolved"] = resolved
    return await emu._send_interaction(INTERACTION_APPLICATION_COMMAND, data, user or emu.member, emu.channel)


def attachment(emu: DiscordEmulator, upload: Upload, **lies: Any) -> dict[str, Any]:
    """An attachment on the emulator's CDN; ``lies`` overwrite what its payload claims (size, type)."""
    payload = emu._store_upload(upload, emu.channel)
    payload.update(lies)
    return payload


# --- ``musicbot run`` in a child process ---


def child_env(emu: DiscordEmulator, db_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSICBOT_", "DISCORD_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        DISCORD_TOKEN=emu.token,
        MUSICBOT_GUILD_ID=str(emu.guild_id),
        MUSICBOT_DB=str(db_path),
        **settings,
    )
    return env


class Child:
    """A running ``tests.reliability.bot_process``: its stdout lines (markers) and stderr (its log)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.stderr = bytearray()
        self._changed = asyncio.Event()
        self._readers = [
            asyncio.create_task(self._read_stdout(), name="child-stdout"),
            asyncio.create_task(self._read_stderr(), name="child-stderr"),
        ]

    async def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.lines.append(line.decode().rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(65536):
            self.stderr += chunk

    async def line(self, prefix: str, timeout: float = CHILD_TIMEOUT) -> str:  # noqa: ASYNC109
        """The first line printed that starts with ``prefix`` (waiting for it)."""
        async with asyncio.timeout(timeout):
            while True:
                found = next((line for line in self.lines if line.startswith(prefix)), None)
                if found is not None:
                    return found
                if self.process.returncode is not None and self._readers[0].done():
                    raise AssertionError(f"the child ended ({self.process.returncode}): {self.log[-2000:]}")
                self._changed.clear()
                await self._changed.wait()

    @property
    def log(self) -> str:
        return self.stderr.decode(errors="replace")

    async def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or closed."""
        self.process.send_signal(signal.SIGKILL)
        await self.finish()

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = CHILD_TIMEOUT) -> int:  # noqa: ASYNC109
        self.process.send_signal(sig)
        async with asyncio.timeout(timeout):
            return await self.finish()

    async def finish(self) -> int:
        code = await self.process.wait()
        await asyncio.wait(self._readers)
        return code


@asynccontextmanager
async def child_bot(
    emu: DiscordEmulator, env: dict[str, str], *args: str, cwd: Path, ready: bool = True
) -> AsyncIterator[Child]:
    """Start the child; with ``ready``, wait until it is connected (a new IDENTIFY)."""
    identified = emu.identify_count
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.reliability.bot_process",
        emu.api_url,
        emu.gateway_url,
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    child = Child(process)
    try:
        if ready:
            await emu.wait_for(
                lambda: emu.identify_count > identified or process.returncode is not None,
                timeout=CHILD_TIMEOUT,
            )
            if process.returncode is not None:
                await child.finish()
                raise AssertionError(f"the bot did not start ({process.returncode}): {child.log[-3000:]}")
        yield child
    except BaseException:
        # Shown with the failure: what the bot said about it.
        print(f"--- child stdout ---\n{chr(10).join(child.lines)}\n--- child log ---\n{child.log[-6000:]}")
        raise
    finally:
        if process.returncode is None:
            process.kill()
        await child.finish()
