"""Running the real bot against the Discord emulator: settings, start/stop, and reading what users see."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from bot.client import MusicBot
from bot.jobs import Job, JobService, WorkerFactory, open_database
from bot.jobs.db import CHECKPOINT_INTERVAL
from bot.runner import make_worker_factory
from bot.settings import MODEL_SIZES, Limits, Settings
from generation import GenerationWorker
from tests.discord_emulator import (
    INTERACTION_APPLICATION_COMMAND,
    DiscordEmulator,
    EmulatedInteraction,
    EmuUser,
    StoredMessage,
)
from tests.jobs.fakes import FakeModels

RESULT_TIMEOUT = 30.0


def tiny_settings(
    db_path: Path,
    guild_id: int | None,
    tiny_model_dir: Path,
    *,
    melody_dir: Path | None = None,
    limits: Limits | None = None,
) -> Settings:
    """Every size is the tiny model on the CPU (melody: the tiny melody model, when given)."""
    sources = {size: str(tiny_model_dir) for size in MODEL_SIZES}
    if melody_dir is not None:
        sources["melody"] = str(melody_dir)
    return Settings(
        db_path=db_path,
        model="small",
        model_sources=sources,
        device="cpu",
        dtype="float32",
        guild_id=guild_id,
        limits=limits or Limits(max_queued=10, daily_seconds=10_000, max_duration=120),
    )


def fake_settings(
    db_path: Path,
    guild_id: int | None,
    *,
    model: str = "small",
    limits: Limits | None = None,
    admin_ids: frozenset[int] = frozenset(),
    queue_size: int = 50,
    max_batch: int = 4,
    job_timeout: float = 300.0,
) -> Settings:
    """Settings for a bot on fake engines: every size maps to ``fake-<size>``."""
    return Settings(
        db_path=db_path,
        model=model,
        model_sources={size: f"fake-{size}" for size in MODEL_SIZES},
        guild_id=guild_id,
        admin_ids=admin_ids,
        limits=limits or Limits(max_queued=10, daily_seconds=10_000, max_duration=120),
        queue_size=queue_size,
        max_batch=max_batch,
        job_timeout=job_timeout,
    )


def fake_workers(models: FakeModels) -> WorkerFactory:
    return lambda: GenerationWorker(models)


@dataclass
class Running:
    emu: DiscordEmulator
    service: JobService
    bot: MusicBot


@asynccontextmanager
async def running_bot(
    emu: DiscordEmulator,
    settings: Settings,
    workers: WorkerFactory | None = None,
    *,
    checkpoint_every: float | None = CHECKPOINT_INTERVAL,
    service_options: dict[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[Running]:
    """A bot process as ``musicbot run`` builds it: database, job service, client; stopped in that order."""
    async with open_database(settings.db_path, checkpoint_every=checkpoint_every) as db:
        workers = workers or make_worker_factory(settings)
        service = JobService(db, settings, workers, **(service_options or {}))
        bot = MusicBot(service, settings, guild_ready_timeout=0.05, **options)
        async with emu.running(bot, wait_ready=True), service:
            yield Running(emu, service, bot)


async def wait_delivered(service: JobService, job_id: int, timeout: float = RESULT_TIMEOUT) -> Job:  # noqa: ASYNC109
    """The job once the bot has recorded delivering its outcome."""
    async with asyncio.timeout(timeout):
        while (job := await service.job(job_id)).delivered_at is None:  # noqa: ASYNC110 - rows have no event
            await asyncio.sleep(0.02)
    return job


def reply(emu: DiscordEmulator, interaction: EmulatedInteraction) -> StoredMessage | None:
    """The interaction's first visible message (its reply, or the ephemeral error that replaced it)."""
    found = emu.interaction_messages(interaction)
    return found[0] if found else None


async def wait_reply(
    emu: DiscordEmulator,
    interaction: EmulatedInteraction,
    done: Callable[[StoredMessage], bool],
    timeout: float = RESULT_TIMEOUT,  # noqa: ASYNC109
) -> StoredMessage:
    def ready() -> StoredMessage | None:
        message = reply(emu, interaction)
        return message if message is not None and not message.loading and done(message) else None

    return await emu.wait_for(ready, timeout=timeout)


async def wait_result(
    emu: DiscordEmulator,
    interaction: EmulatedInteraction,
    timeout: float = RESULT_TIMEOUT,  # noqa: ASYNC109
) -> StoredMessage:
    """The reply once it carries the result (its attachments), after any status edits."""
    return await wait_reply(emu, interaction, lambda m: bool(m.attachments), timeout)


async def wait_channel_message(
    emu: DiscordEmulator,
    channel: Any,
    done: Callable[[StoredMessage], bool],
    timeout: float = RESULT_TIMEOUT,  # noqa: ASYNC109
) -> StoredMessage:
    def found() -> StoredMessage | None:
        return next((m for m in emu.channel_messages(channel) if done(m)), None)

    return await emu.wait_for(found, timeout=timeout)


def audio_of(message: StoredMessage, filename: str | None = None) -> tuple[np.ndarray, int]:
    """An attachment decoded as a user's player would: (frames, channels) float, rate."""
    data, rate = sf.read(io.BytesIO(message.attachment_bytes(filename)), dtype="float32", always_2d=True)
    return data, rate


def filenames(message: StoredMessage) -> list[str]:
    return [str(a["filename"]) for a in message.attachments]


def button_id(message: StoredMessage, label: str) -> str:
    for custom_id in message.custom_ids():
        component = message.find_component(custom_id)
        if component is not None and component.get("label") == label:
            return custom_id
    raise AssertionError(f"no {label!r} button on message {message.id}: {message.custom_ids()}")


def seeds_in(content: str) -> list[int]:
    import re

    match = re.search(r"seeds? ([0-9, ]+)", content)
    assert match, content
    return [int(s) for s in match.group(1).replace(",", " ").split()]


async def crafted_command(
    emu: DiscordEmulator, name: str, options: Sequence[dict[str, Any]], *, user: EmuUser
) -> EmulatedInteraction:
    """A slash command whose options skip Discord's own checks, as a modified client can send."""
    command = emu.synced_commands(emu.guild_id)
    found = next(c for c in command if c["name"] == name)
    data = {
        "id": found["id"],
        "name": name,
        "type": 1,
        "options": list(options),
        "guild_id": str(emu.guild_id),
    }
    return await emu._send_interaction(INTERACTION_APPLICATION_COMMAND, data, user, emu.channel)


def everyone_sees_admin_commands(emu: DiscordEmulator) -> None:
    """The server overrode /model's and /limits' default permissions: any member may invoke them."""
    emu._check_command_visible = lambda command, user: None  # type: ignore[method-assign]
