"""A melody attachment on /music: the melody model makes that job; unusable files get their own message."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.bot.harness import (
    audio_of,
    fake_settings,
    fake_workers,
    running_bot,
    tiny_settings,
    wait_reply,
    wait_result,
)
from tests.discord_emulator import DiscordEmulator, Upload
from tests.jobs.fakes import FakeModels


def tune(seconds: float, rate: int = 32000) -> bytes:
    """A WAV of a rising tone, as a user would hum or play one."""
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.4 * np.sin(2 * np.pi * (220 + 110 * t / max(seconds, 1)) * t)
    buffer = io.BytesIO()
    sf.write(buffer, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


async def test_a_melody_attachment_makes_that_job_on_the_melody_model(
    emu: DiscordEmulator, db_path: Path, tiny_model_dir: Path, tiny_melody_dir: Path
) -> None:
    settings = tiny_settings(db_path, emu.guild_id, tiny_model_dir, melody_dir=tiny_melody_dir)
    async with running_bot(emu, settings) as bot:
        options = {
            "prompt": "hummed tune, strings",
            "duration": 1.0,
            "melody": Upload("my tune.wav", tune(3.0)),
        }
        result = await wait_result(emu, await emu.invoke_command("music", options))
        plain = await wait_result(
            emu, await emu.invoke_command("music", {"prompt": "no tune", "duration": 1.0})
        )
        model = bot.service.model

    audio, rate = audio_of(result)
    assert rate == 32000 and audio.shape == (32000, 1)
    assert "melody · 1 s" in result.content and "follows your melody" in result.content
    # The chosen model stays for everything else.
    assert "small · 1 s" in plain.content and model == "small"
    assert emu.violations == []


@pytest.mark.parametrize(
    ("upload", "message"),
    [
        (Upload("tune.wav", b"RIFF but not really a wave file"), "The file is not audio that can be read"),
        (Upload("tune.wav", bytes(20 * 2**20 + 1)), "The audio file is too large (20.0 MiB; at most 20 MiB)"),
        (Upload("tune.wav", tune(601.0, rate=1000)), "The melody is 601 s long; at most 600 s"),
    ],
    ids=["not-audio", "too-large", "too-long"],
)
async def test_an_unusable_melody_file_gets_its_own_message_and_nothing_is_queued(
    emu: DiscordEmulator, db_path: Path, models: FakeModels, upload: Upload, message: str
) -> None:
    settings = fake_settings(db_path, emu.guild_id, model="melody")
    async with running_bot(emu, settings, fake_workers(models)) as bot:
        interaction = await emu.invoke_command("music", {"prompt": "tune", "melody": upload})
        refused = await wait_reply(emu, interaction, lambda m: bool(m.content))
        usage = await bot.service.usage(emu.member.id)

    assert refused.ephemeral and refused.content.startswith("❌ " + message)
    assert usage.active_jobs == 0 and usage.seconds_used == 0 and models.calls == []
    assert emu.violations == []


async def test_a_melody_on_a_model_that_cannot_follow_one_says_so(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    async with running_bot(emu, fake_settings(db_path, emu.guild_id), fake_workers(models)):
        options = {"prompt": "tune", "melody": Upload("tune.wav", tune(2.0))}
        refused = await wait_reply(emu, await emu.invoke_command("music", options), lambda m: bool(m.content))

    assert (
        refused.ephemeral
        and "cannot follow a melody" in refused.content
        and "/model melody" in refused.content
    )
