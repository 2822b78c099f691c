"""/queue, /cancel, /usage, /model, /limits, refusals and mentions, through the emulator (fake engine)."""

from __future__ import annotations

from pathlib import Path

import discord

from bot.jobs import JobState
from bot.settings import Limits
from tests.bot.harness import (
    crafted_command,
    everyone_sees_admin_commands,
    fake_settings,
    fake_workers,
    reply,
    running_bot,
    wait_reply,
    wait_result,
)
from tests.discord_emulator import (
    DEFAULT_BOT_PERMISSIONS,
    DiscordEmulator,
    EmulatedInteraction,
    StoredMessage,
)
from tests.jobs.fakes import FakeModels


async def answer(emu: DiscordEmulator, interaction: EmulatedInteraction) -> StoredMessage:
    return await wait_reply(emu, interaction, lambda m: bool(m.content))


async def test_every_command_is_synced_with_its_declared_ranges_and_admin_defaults(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    async with running_bot(emu, fake_settings(db_path, emu.guild_id), fake_workers(models)):
        pass
    commands = {c["name"]: c for c in emu.synced_commands(emu.guild_id)}
    assert set(commands) == {"music", "variations", "queue", "cancel", "usage", "model", "limits"}
    music = {o["name"]: o for o in commands["music"]["options"]}
    assert (music["duration"]["min_value"], music["duration"]["max_value"]) == (1.0, 600.0)
    assert (music["variations"]["min_value"], music["variations"]["max_value"]) == (1, 4)
    assert (music["top_p"]["min_value"], music["top_p"]["max_value"]) == (0.0, 1.0)
    assert music["melody"]["type"] == 11 and music["prompt"]["max_length"] == 400
    assert [c["value"] for c in commands["model"]["options"][0]["choices"]] == [
        "small",
        "medium",
        "large",
        "melody",
        "melody-large",
        "stereo-small",
        "stereo-medium",
        "stereo-large",
        "stereo-melody",
        "stereo-melody-large",
    ]
    manage_guild = str(discord.Permissions(manage_guild=True).value)
    assert str(commands["model"]["default_member_permissions"]) == manage_guild
    assert str(commands["limits"]["default_member_permissions"]) == manage_guild
    assert commands["music"]["default_member_permissions"] is None
    assert emu.command_syncs[-1][0] == emu.guild_id


async def test_without_a_guild_id_commands_are_synced_globally(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    async with running_bot(emu, fake_settings(db_path, None), fake_workers(models)):
        pass
    assert [scope for scope, _ in emu.command_syncs] == [None]
    assert len(emu.synced_commands(None)) == 7


async def test_queue_shows_your_jobs_with_positions_and_estimates(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    async with running_bot(emu, fake_settings(db_path, emu.guild_id), fake_workers(models)):
        # A first job teaches the bot how fast the model is, so that it can estimate waits.
        await wait_result(emu, await emu.invoke_command("music", {"prompt": "warm-up", "duration": 1.0}))
        models.hold()
        models.generating.clear()
        await emu.invoke_command("music", {"prompt": "owner's", "duration": 3.0}, user=emu.owner)
        await models.wait_generating()
        for prompt in ("mine one", "mine two"):
            queued = await emu.invoke_command("music", {"prompt": prompt, "duration": 2.0})
            await wait_reply(emu, queued, lambda m: "position" in m.content)
        shown = await answer(emu, await emu.invoke_command("queue", {}))
        models.release()

    assert shown.ephemeral
    assert "3 in the whole queue" in shown.content and "owner's" not in shown.content
    assert "#3 music, 2 s, “mine one”: position 1, starts in ~" in shown.content
    assert "#4 music, 2 s, “mine two”: position 2, starts in ~" in shown.content
    assert shown.content.count("done in ~") == 2


async def test_cancel_without_a_job_cancels_your_waiting_jobs_and_names_them(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    models.hold()
    async with running_bot(emu, fake_settings(db_path, emu.guild_id), fake_workers(models)) as bot:
        first = await emu.invoke_command("music", {"prompt": "running", "duration": 2.0})
        await models.wait_generating()
        second = await emu.invoke_command("music", {"prompt": "waiting", "duration": 2.0})
        await wait_reply(emu, second, lambda m: "position 1" in m.content)
        shown = await answer(emu, await emu.invoke_command("cancel", {}))
        status = await wait_reply(emu, second, lambda m: "cancelled" in m.content)
        states = [(await bot.service.job(job_id)).state for job_id in (1, 2)]
        models.release()
        await wait_result(emu, first)

    assert shown.ephemeral and "Cancelled 1 waiting job: #2." in shown.content
    assert "Job #1 is generating now; `/cancel job:1` stops it." in shown.content
    assert states == [JobState.RUNNING, JobState.CANCELLED]
    assert "🚫 Job #2" in status.content and emu.violations == []


async def test_cancel_of_someone_elses_job_is_refused_but_an_admin_may(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    models.hold()
    other = emu.add_user("other")
    async with running_bot(emu, fake_settings(db_path, emu.guild_id), fake_workers(models)) as bot:
        await emu.invoke_command("music", {"prompt": "busy", "duration": 2.0}, user=other)
        await models.wait_generating()
        queued = await emu.invoke_command("music", {"prompt": "member's", "duration": 2.0})
        await wait_reply(emu, queued, lambda m: "position 1" in m.content)
        refused = await answer(emu, await emu.invoke_command("cancel", {"job": 2}, user=other))
        still = (await bot.service.job(2)).state
        done = await answer(emu, await emu.invoke_command("cancel", {"job": 2}, user=emu.owner))
        after = (await bot.service.job(2)).state
        models.release()

    assert refused.ephemeral and "Only the person who asked for job #2 or an admin" in refused.content
    assert still is JobState.QUEUED
    assert done.content == "Cancelled job #2." and after is JobState.CANCELLED


async def test_usage_shows_limits_and_what_is_left(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    settings = fake_settings(
        db_path, emu.guild_id, limits=Limits(max_queued=3, daily_seconds=100, max_duration=30)
    )
    async with running_bot(emu, settings, fake_workers(models)):
        await wait_result(
            emu, await emu.invoke_command("music", {"prompt": "a", "duration": 5.0, "variations": 2})
        )
        shown = await answer(emu, await emu.invoke_command("usage", {}))

    assert shown.ephemeral
    assert "10 s of 100 s used in the last 24 h; 90 s left (daily_seconds)" in shown.content
    assert "0 of 3 (max_queued)" in shown.content and "30 s (max_duration)" in shown.content


async def test_a_user_over_a_limit_is_refused_privately_with_the_limit_named(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    settings = fake_settings(
        db_path, emu.guild_id, limits=Limits(max_queued=1, daily_seconds=100, max_duration=30)
    )
    models.hold()
    async with running_bot(emu, settings, fake_workers(models)) as bot:
        await emu.invoke_command("music", {"prompt": "one", "duration": 2.0})
        await models.wait_generating()
        second = await emu.invoke_command("music", {"prompt": "two", "duration": 2.0})
        too_many = await answer(emu, second)
        third = await emu.invoke_command(
            "music", {"prompt": "long", "duration": 31.0}, user=emu.add_user("x")
        )
        too_long = await answer(emu, third)
        queued = [entry.job.id for entry in bot.service.queue()]
        models.release()

    assert too_many.ephemeral and "(max_queued)" in too_many.content
    assert too_long.ephemeral and "The longest track you can ask for is 30 s" in too_long.content
    # The public "thinking" reply was removed: nobody else sees the refusal.
    assert [m.id for m in emu.interaction_messages(second)] == [too_many.id]
    assert queued == [1] and emu.violations == []


async def test_values_a_crafted_request_sneaks_past_discord_are_refused(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    async with running_bot(emu, fake_settings(db_path, emu.guild_id), fake_workers(models)) as bot:
        huge = await crafted_command(
            emu,
            "music",
            [{"type": 3, "name": "prompt", "value": "x"}, {"type": 10, "name": "duration", "value": 1e9}],
            user=emu.owner,
        )
        refused_duration = await answer(emu, huge)
        many = await crafted_command(
            emu,
            "music",
            [{"type": 3, "name": "prompt", "value": "x"}, {"type": 4, "name": "variations", "value": 9}],
            user=emu.member,
        )
        refused_variations = await answer(emu, many)
        negative = await crafted_command(
            emu, "limits", [{"type": 4, "name": "max_queued", "value": -5}], user=emu.owner
        )
        refused_limit = await answer(emu, negative)
        limits = await bot.service.limits()

    assert (
        refused_duration.ephemeral
        and refused_duration.content == "❌ Duration must be between 1 and 600 (got 1e+09)."
    )
    assert refused_variations.content == "❌ Variations must be between 1 and 4 (got 9)."
    assert refused_limit.content == "❌ Max_queued must be between 0 and 100 (got -5)."
    assert bot.service.queue() == [] and limits.max_queued == 10 and emu.violations == []


async def test_a_non_admin_is_refused_model_and_nothing_changes(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    everyone_sees_admin_commands(emu)
    async with running_bot(emu, fake_settings(db_path, emu.guild_id), fake_workers(models)) as bot:
        refused = await answer(emu, await emu.invoke_command("model", {"size": "large"}))
        limits = await answer(emu, await emu.invoke_command("limits", {"max_queued": 50}))
        current, loads = bot.service.model, list(models.loads)
        stored = await bot.service.limits()

    assert refused.ephemeral and "Only admins" in refused.content and "Manage Server" in refused.content
    assert "Only admins" in limits.content
    assert current == "small" and loads == ["fake-small"] and stored.max_queued == 10


async def test_an_admin_switches_the_model_and_it_survives_a_restart(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    settings = fake_settings(db_path, emu.guild_id)
    async with running_bot(emu, settings, fake_workers(models)):
        switched = await wait_reply(
            emu,
            await emu.invoke_command("model", {"size": "medium"}, user=emu.owner),
            lambda m: "Switched" in m.content,
        )
    async with running_bot(emu, settings, fake_workers(models)) as bot:
        shown = await answer(emu, await emu.invoke_command("model", {}, user=emu.owner))
        result = await wait_result(
            emu, await emu.invoke_command("music", {"prompt": "after", "duration": 1.0})
        )

    assert switched.ephemeral and "**medium**" in switched.content
    assert "Model: **medium**" in shown.content and bot.service.model == "medium"
    assert "`stereo-small`: stereo, 0.6 B parameters, about 1.2 GB (fp32: 2.4 GB)" in shown.content
    assert "`large`: mono, 3.4 B parameters, about 6.8 GB" in shown.content
    assert models.loads == ["fake-small", "fake-medium", "fake-medium"]
    assert "fake-medium · 1 s" in result.content


async def test_a_user_in_admin_ids_may_use_admin_commands(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    everyone_sees_admin_commands(emu)
    settings = fake_settings(db_path, emu.guild_id, admin_ids=frozenset({emu.member.id}))
    async with running_bot(emu, settings, fake_workers(models)) as bot:
        shown = await answer(emu, await emu.invoke_command("limits", {"daily_seconds": 42}))
        limits = await bot.service.limits()

    assert "Saved." in shown.content and limits.daily_seconds == 42


async def test_limits_changes_one_users_limit_and_it_holds(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    models.hold()
    async with running_bot(emu, fake_settings(db_path, emu.guild_id), fake_workers(models)) as bot:
        options = {"user": emu.member, "max_queued": 1}
        saved = await answer(emu, await emu.invoke_command("limits", options, user=emu.owner))
        await emu.invoke_command("music", {"prompt": "one", "duration": 2.0})
        await models.wait_generating()
        refused = await answer(emu, await emu.invoke_command("music", {"prompt": "two", "duration": 2.0}))
        others = await emu.invoke_command(
            "music", {"prompt": "other", "duration": 2.0}, user=emu.add_user("y")
        )
        await wait_reply(emu, others, lambda m: "position 1" in m.content)
        shown = await answer(emu, await emu.invoke_command("limits", {"user": emu.member}, user=emu.owner))
        member_limits = await bot.service.limits(emu.member.id)
        models.release()

    assert saved.ephemeral and f"Limits for <@{emu.member.id}>: max_queued 1" in saved.content
    assert saved.pinged_user_ids == set()
    assert "(max_queued)" in refused.content and member_limits.max_queued == 1
    assert "max_queued 1" in shown.content and "set by an admin: max_queued" in shown.content


async def test_a_prompt_with_everyone_and_mentions_pings_no_one(db_path: Path, models: FakeModels) -> None:
    # The bot may mention everyone here, so only allowed_mentions stands between the prompt and a ping.
    may_ping = DEFAULT_BOT_PERMISSIONS | discord.Permissions(mention_everyone=True).value
    async with DiscordEmulator(bot_permissions=may_ping, max_lifetime=60) as emu:
        role = emu.add_role("listeners")
        prompt = f"@everyone @here dance <@{emu.owner.id}> <@&{role.id}>"
        async with running_bot(emu, fake_settings(db_path, emu.guild_id), fake_workers(models)):
            interaction = await emu.invoke_command("music", {"prompt": prompt, "duration": 1.0})
            result = await wait_result(emu, interaction)

    assert f"<@{emu.owner.id}>" in result.content and "@everyone" in result.content
    sent = emu.calls_to(None, "^/webhooks/", interaction=interaction)
    assert sent and all(call.json.get("allowed_mentions") == {"parse": []} for call in sent if call.json)
    for version in [*result.versions, result.data]:
        assert version.get("mentions", []) == [] and not version.get("mention_everyone")
        assert version.get("mention_roles", []) == []
    assert result.pinged_user_ids == set() and not result.mentions_everyone
    assert reply(emu, interaction) is result
