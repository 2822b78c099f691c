"""Delivery: after the token lifetime, over the upload limit, and across bot restarts (fake engine)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from bot.jobs import JobKind
from tests.bot.harness import (
    audio_of,
    button_id,
    fake_settings,
    fake_workers,
    filenames,
    running_bot,
    wait_channel_message,
    wait_delivered,
    wait_reply,
    wait_result,
)
from tests.discord_emulator import DiscordEmulator
from tests.jobs.fakes import SAMPLE_RATE, FakeModels


async def test_a_result_ready_after_the_token_lifetime_goes_to_the_channel_with_a_mention(
    db_path: Path, models: FakeModels
) -> None:
    models.steps, models.step_seconds = 5, 0.5
    async with DiscordEmulator(token_lifetime=1.5, max_lifetime=60) as emu:
        settings = fake_settings(db_path, emu.guild_id)
        lifetime = timedelta(seconds=emu.token_lifetime)
        async with running_bot(emu, settings, fake_workers(models), interaction_lifetime=lifetime) as bot:
            interaction = await emu.invoke_command("music", {"prompt": "slow @everyone", "duration": 2.0})
            posted = await wait_channel_message(emu, emu.channel, lambda m: bool(m.attachments))
            status = await wait_reply(emu, interaction, lambda m: "done" in m.content)
            job = await wait_delivered(bot.service, 1)

    assert posted.interaction_id is None  # a channel message, not the expired interaction's reply
    assert posted.content.startswith(f"<@{emu.member.id}> your music is ready.")
    assert posted.pinged_user_ids == {emu.member.id} and not posted.mentions_everyone
    assert audio_of(posted)[0].shape == (2 * SAMPLE_RATE, 1)
    assert button_id(posted, "Variations")
    assert f"/{posted.channel_id}/{posted.id}" in status.content  # the old reply links to the result
    assert job.delivered_at is not None and job.delivery.interaction_token is None
    assert emu.violations == []


async def test_a_wav_over_the_upload_limit_is_sent_as_flac(db_path: Path, models: FakeModels) -> None:
    emu = DiscordEmulator(attachment_size_limit=20_000, max_lifetime=60)
    async with emu, running_bot(emu, fake_settings(db_path, emu.guild_id), fake_workers(models)):
        result = await wait_result(
            emu, await emu.invoke_command("music", {"prompt": "tone", "duration": 2.0})
        )

    [name] = filenames(result)
    audio, rate = audio_of(result)
    assert name.endswith(".flac") and rate == SAMPLE_RATE and audio.shape == (2 * SAMPLE_RATE, 1)
    assert "Sent as FLAC" in result.content and "20 KiB" in result.content
    assert emu.violations == []


@pytest.mark.parametrize(("extra", "kind"), [(0, "flac"), (100, "wav")])
async def test_a_stereo_wav_counts_both_channels_against_the_upload_limit(
    db_path: Path, models: FakeModels, extra: int, kind: str
) -> None:
    models.channels = 2
    stereo_wav = 44 + 2 * 2 * 2 * SAMPLE_RATE  # 2 s of 16-bit samples on two channels, with its header
    emu = DiscordEmulator(attachment_size_limit=stereo_wav - 100 + extra, max_lifetime=60)
    async with emu, running_bot(emu, fake_settings(db_path, emu.guild_id), fake_workers(models)):
        result = await wait_result(
            emu, await emu.invoke_command("music", {"prompt": "wide", "duration": 2.0})
        )

    [name] = filenames(result)
    audio, _ = audio_of(result)
    assert name.endswith(f".{kind}") and audio.shape == (2 * SAMPLE_RATE, 2)
    assert not np.array_equal(audio[:, 0], audio[:, 1])  # two channels of their own
    assert ("Sent as FLAC" in result.content) == (kind == "flac")
    assert emu.violations == []


async def test_a_track_too_large_even_as_flac_is_explained(db_path: Path, models: FakeModels) -> None:
    emu = DiscordEmulator(attachment_size_limit=1000, max_lifetime=60)
    async with emu, running_bot(emu, fake_settings(db_path, emu.guild_id), fake_workers(models)) as bot:
        interaction = await emu.invoke_command("music", {"prompt": "tone", "duration": 2.0})
        result = await wait_reply(emu, interaction, lambda m: "too large" in m.content)
        job = await wait_delivered(bot.service, 1)

    assert result.attachments == []
    assert "too large to upload here even as FLAC" in result.content and "shorter duration" in result.content
    assert button_id(result, "Regenerate") and job.delivered_at is not None
    assert emu.violations == []


async def test_buttons_on_a_result_work_after_the_bot_restarts(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    settings = fake_settings(db_path, emu.guild_id)
    async with running_bot(emu, settings, fake_workers(models)):
        result = await wait_result(
            emu, await emu.invoke_command("music", {"prompt": "before", "duration": 1.0})
        )
    async with running_bot(emu, settings, fake_workers(models)) as bot:
        await emu.click_button(result, button_id(result, "Variations"))
        thread = await emu.wait_for(lambda: emu.thread_of(result))
        posted = await wait_channel_message(emu, thread, lambda m: bool(m.attachments))
        again = await emu.click_button(result, button_id(result, "Regenerate"))
        regenerated = await wait_result(emu, again)
        kinds = [(await bot.service.job(job_id)).kind for job_id in (2, 3)]

    assert thread.name == "before" and len(filenames(posted)) == 2
    assert "“before”" in regenerated.content and regenerated.attachments
    assert kinds == [JobKind.VARIATIONS, JobKind.REGENERATE]
    assert emu.violations == []


async def test_a_job_interrupted_by_a_restart_is_finished_in_its_reply(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    settings = fake_settings(db_path, emu.guild_id)
    models.hold()
    async with running_bot(emu, settings, fake_workers(models)):
        interaction = await emu.invoke_command("music", {"prompt": "interrupted", "duration": 1.0})
        await models.wait_generating()
        await wait_reply(emu, interaction, lambda m: "Job #1" in m.content)
    models.release()
    async with running_bot(emu, settings, fake_workers(models)):
        result = await wait_result(emu, interaction)

    shown = [version.get("content") or "" for version in result.versions]
    assert any("waiting again after a restart" in text for text in shown), shown
    assert audio_of(result)[0].shape == (SAMPLE_RATE, 1) and len(emu.interaction_messages(interaction)) == 1
    assert emu.violations == []
