"""/music and the buttons under its result, end to end: the real client, service and tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bot.jobs import JobKind
from tests.bot.harness import (
    Running,
    audio_of,
    button_id,
    filenames,
    running_bot,
    seeds_in,
    tiny_settings,
    wait_channel_message,
    wait_reply,
    wait_result,
)
from tests.discord_emulator import DiscordEmulator, StoredMessage

RATE = 32000
PROMPT = "calm lo-fi piano, rain"


async def music(bot: Running, **options: object) -> StoredMessage:
    interaction = await bot.emu.invoke_command("music", {"prompt": PROMPT, "duration": 1.5, **options})
    return await wait_result(bot.emu, interaction)


async def test_music_is_deferred_then_answered_with_a_wav_of_the_asked_length(
    emu: DiscordEmulator, db_path: Path, tiny_model_dir: Path
) -> None:
    async with running_bot(emu, tiny_settings(db_path, emu.guild_id, tiny_model_dir)):
        interaction = await emu.invoke_command("music", {"prompt": PROMPT, "duration": 1.5, "seed": 42})
        result = await wait_result(emu, interaction)

    latency = emu.ack_latency(interaction)
    assert latency is not None and latency < 3.0
    # "thinking", then the queue position, then the result: all in the one reply.
    contents = [version.get("content") for version in result.versions] + [result.content]
    assert (
        contents[0] == ""
        and "Job #1" in contents[1]
        and ("position" in contents[1] or "generating" in contents[1])
    )
    [name] = filenames(result)
    assert name.endswith(".wav")
    audio, rate = audio_of(result)
    assert rate == RATE and audio.shape == (int(1.5 * RATE), 1)
    assert np.abs(audio).max() > 0.01
    for shown in ("“calm lo-fi piano, rain”", "small", "1.5 s", "seed 42", "guidance 3", "temperature 1"):
        assert shown in result.content
    labels = {result.find_component(c)["label"] for c in result.custom_ids()}  # type: ignore[index]
    assert labels == {"Variations", "Extend", "Regenerate"}
    assert not result.ephemeral and emu.unfinished_deferrals() == [] and emu.violations == []


async def test_variations_button_posts_variations_in_a_thread_named_after_the_prompt(
    emu: DiscordEmulator, db_path: Path, tiny_model_dir: Path
) -> None:
    async with running_bot(emu, tiny_settings(db_path, emu.guild_id, tiny_model_dir)) as bot:
        result = await music(bot)
        click = await emu.click_button(result, button_id(result, "Variations"), user=emu.owner)
        note = await wait_reply(emu, click, lambda m: "thread" not in m.content or "<#" in m.content)
        thread = await emu.wait_for(lambda: emu.thread_of(result))
        posted = await wait_channel_message(emu, thread, lambda m: bool(m.attachments))
        parent = await bot.service.job_for_thread(thread.id)

    assert note.ephemeral and f"<#{thread.id}>" in note.content
    assert thread.name == PROMPT and thread.parent_id == emu.channel.id
    names = filenames(posted)
    assert len(names) == 2 and all(name.endswith(".wav") for name in names)
    takes = [audio_of(posted, name)[0] for name in names]
    assert all(take.shape == (int(1.5 * RATE), 1) for take in takes)
    assert not np.array_equal(takes[0], takes[1])
    assert PROMPT in posted.content and posted.pinged_user_ids == {emu.owner.id}
    assert parent is not None and parent.id == 1
    assert emu.violations == []


async def test_variations_command_inside_the_thread_makes_more_of_its_track(
    emu: DiscordEmulator, db_path: Path, tiny_model_dir: Path
) -> None:
    async with running_bot(emu, tiny_settings(db_path, emu.guild_id, tiny_model_dir)) as bot:
        result = await music(bot, seed=7)
        click = await emu.click_button(result, button_id(result, "Variations"))
        thread = await emu.wait_for(lambda: emu.thread_of(result))
        await wait_reply(emu, click, lambda m: "<#" in m.content)
        more = await emu.invoke_command("variations", {"count": 3, "prompt": "with drums"}, channel=thread)
        posted = await wait_result(emu, more)
        job = await bot.service.job(3)
        outside = await emu.invoke_command("variations", {})
        refusal = await wait_reply(emu, outside, lambda m: bool(m.content))

    assert posted.channel_id == thread.id and len(filenames(posted)) == 3
    assert "calm lo-fi piano, rain, with drums" in posted.content
    assert job.kind is JobKind.VARIATIONS and job.parent is not None and job.parent.job_id == 1
    assert refusal.ephemeral and "inside a result's thread" in refusal.content
    assert emu.violations == []


async def test_extend_continues_the_track_and_keeps_the_original(
    emu: DiscordEmulator, db_path: Path, tiny_model_dir: Path
) -> None:
    async with running_bot(emu, tiny_settings(db_path, emu.guild_id, tiny_model_dir)):
        interaction = await emu.invoke_command("music", {"prompt": PROMPT, "duration": 2.0})
        result = await wait_result(emu, interaction)
        await emu.click_button(result, button_id(result, "Extend"))
        thread = await emu.wait_for(lambda: emu.thread_of(result))
        extended = await wait_channel_message(emu, thread, lambda m: bool(m.attachments))

    original, _ = audio_of(result)
    longer, rate = audio_of(extended)
    assert rate == RATE and longer.shape == (4 * RATE, 1)
    kept = 2 * RATE - RATE // 4  # the last 0.25 s of the original is cross-faded into the new part
    # Sample for sample, within one 16-bit step (the WAV/FLAC round trip may move a sample by one step).
    np.testing.assert_allclose(longer[:kept], original[:kept], rtol=0, atol=1.5 / 32768)
    assert np.abs(original[:kept]).max() > 0.01
    assert "4 s (2 s + 2 s new)" in extended.content
    assert emu.violations == []


async def test_regenerate_makes_the_same_prompt_with_a_new_seed(
    emu: DiscordEmulator, db_path: Path, tiny_model_dir: Path
) -> None:
    async with running_bot(emu, tiny_settings(db_path, emu.guild_id, tiny_model_dir)) as bot:
        first = await music(bot, seed=1234)
        click = await emu.click_button(first, button_id(first, "Regenerate"))
        again = await wait_result(emu, click)
        job = await bot.service.job(2)

    assert again.id != first.id and again.channel_id == emu.channel.id and not again.ephemeral
    assert seeds_in(first.content) == [1234]
    assert seeds_in(again.content) != [1234]
    assert "“calm lo-fi piano, rain”" in again.content
    assert not np.array_equal(audio_of(first)[0], audio_of(again)[0])
    assert job.kind is JobKind.REGENERATE and audio_of(again)[0].shape == (int(1.5 * RATE), 1)
    assert emu.violations == []


@pytest.mark.parametrize("variations", [2])
async def test_each_variation_is_its_own_file_with_its_own_seed(
    emu: DiscordEmulator, db_path: Path, tiny_model_dir: Path, variations: int
) -> None:
    async with running_bot(emu, tiny_settings(db_path, emu.guild_id, tiny_model_dir)) as bot:
        result = await music(bot, seed=10, variations=variations)

    assert len(filenames(result)) == variations
    assert seeds_in(result.content) == [10, 11]
    assert {result.find_component(c)["label"] for c in result.custom_ids()} == {  # type: ignore[index]
        "Variations",
        "Extend 1",
        "Extend 2",
        "Regenerate",
    }
