"""No one let in: admin commands refused to non-admins whatever the server's command permissions say,
nobody reads or cancels another user's jobs, prompts never ping, and no token reaches a log."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import discord

from tests.discord_emulator import DEFAULT_BOT_PERMISSIONS, DiscordEmulator, StoredMessage
from tests.reliability.harness import (
    FAIL_MARK,
    FaultyModels,
    answered,
    bot_running,
    child_bot,
    child_env,
    crafted,
    rows,
    settings_for,
)

MANAGE_GUILD = discord.Permissions(manage_guild=True).value
ONLY_ADMINS = "❌ Only admins (members with Manage Server, or users in MUSICBOT_ADMIN_IDS) can use"
# Shaped like a real bot token (user id, timestamp, HMAC), so that a leak would look like one.
TOKEN = "MTA5ODc2NTQzMjEwOTg3NjU0MzI.GhIjKl.abcdefghijklmnopqrstuvwxyz0123456789AB"


async def test_admin_commands_are_refused_to_members_without_manage_server_even_if_the_server_allows_them(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels
) -> None:
    moderators = emu.add_role("moderators", MANAGE_GUILD)
    moderator = emu.add_user("moderator", roles=[moderators])
    async with bot_running(emu, settings_for(db_path, emu.guild_id), models) as bot:
        # Crafted as from a server that overrode /model's and /limits' default permissions.
        model = await answered(
            emu, await crafted(emu, "model", [{"type": 3, "name": "size", "value": "large"}])
        )
        limits = await answered(
            emu, await crafted(emu, "limits", [{"type": 4, "name": "daily_seconds", "value": 99999}])
        )
        shown = await answered(emu, await crafted(emu, "limits", []))
        allowed = await answered(
            emu, await emu.invoke_command("limits", {"daily_seconds": 42}, user=moderator)
        )
        current, stored = bot.service.model, await bot.service.limits()

    assert model.ephemeral and model.content == ONLY_ADMINS + " /model."
    assert limits.content == ONLY_ADMINS + " /limits." and shown.content == ONLY_ADMINS + " /limits."
    assert allowed.content.startswith("Saved.") and stored.daily_seconds == 42
    assert current == "small" and models.loads == ["fake-small"]
    assert emu.violations == []


async def test_no_one_sees_or_cancels_another_users_jobs(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels
) -> None:
    snoop = emu.add_user("snoop")
    models.hold()
    async with bot_running(emu, settings_for(db_path, emu.guild_id, max_batch=1), models) as bot:
        for prompt in ("my private running song", "my private waiting song"):
            mine = await emu.invoke_command("music", {"prompt": prompt, "duration": 1.0})
            await answered(emu, mine, lambda m: "Job #" in m.content)
        queue = await answered(emu, await emu.invoke_command("queue", {}, user=snoop))
        usage = await answered(emu, await emu.invoke_command("usage", {}, user=snoop))
        one = await answered(emu, await emu.invoke_command("cancel", {"job": 2}, user=snoop))
        every = await answered(emu, await emu.invoke_command("cancel", {}, user=snoop))
        states = [(await bot.service.job(n)).state.value for n in (1, 2)]
        models.release()

    said = [queue, usage, one, every]
    assert all(message.ephemeral for message in said)
    assert all("private" not in message.content and "#1" not in message.content for message in said)
    assert queue.content == "You have no jobs waiting or running. The queue holds 2 jobs."
    assert "0 of 10 (max_queued)" in usage.content and "0 s of" in usage.content
    assert one.content == "❌ Only the person who asked for job #2 or an admin can cancel it."
    assert every.content == "You have no waiting jobs to cancel."
    assert states == ["running", "queued"] and emu.violations == []


def posted(emu: DiscordEmulator, matches: Callable[[StoredMessage], bool]) -> StoredMessage | None:
    """A message the bot posted in the channel itself (not an interaction's reply)."""
    return next((m for m in emu.channel_messages() if m.interaction_id is None and matches(m)), None)


async def test_prompts_never_ping_even_when_results_and_failures_go_to_the_channel(
    db_path: Path, models: FaultyModels
) -> None:
    may_ping = DEFAULT_BOT_PERMISSIONS | discord.Permissions(mention_everyone=True).value
    async with DiscordEmulator(token_lifetime=1.0, bot_permissions=may_ping, max_lifetime=60) as emu:
        role, other = emu.add_role("listeners"), emu.add_user("other")
        pings = f"@everyone @here <@{other.id}> <@&{role.id}> <@{emu.owner.id}>"
        settings = settings_for(db_path, emu.guild_id)
        models.hold()
        async with bot_running(emu, settings, models, interaction_lifetime=timedelta(seconds=1.0)):
            made = await emu.invoke_command("music", {"prompt": f"dance {pings}", "duration": 1.0})
            await models.wait_generating()  # alone in its batch: the failing one must not share it
            failing = await emu.invoke_command("music", {"prompt": f"{FAIL_MARK} {pings}", "duration": 1.0})
            await answered(emu, failing, lambda m: "position" in m.content)
            await asyncio.sleep(1.1)  # the interactions expire: outcomes go to the channel
            models.release()
            result = await emu.wait_for(lambda: posted(emu, lambda m: bool(m.attachments)))
            failure = await emu.wait_for(lambda: posted(emu, lambda m: "failed" in m.content))
        replies = [emu.interaction_messages(made), emu.interaction_messages(failing)]

    for message in (result, failure):
        assert message.interaction_id is None and pings.split()[2] in message.content  # shown, not pinged
        assert message.pinged_user_ids == {emu.member.id}  # only the requester
        assert message.pinged_role_ids == set() and not message.mentions_everyone
    assert all(m.pinged_user_ids == set() for found in replies for m in found)
    assert emu.violations == []


async def test_the_token_never_reaches_the_log_even_at_debug_level(db_path: Path, tmp_path: Path) -> None:
    async with DiscordEmulator(token=TOKEN, max_lifetime=60) as emu:
        env = child_env(emu, db_path)
        async with child_bot(emu, env, "-v", "--fail", "[fail] beat", cwd=tmp_path) as child:
            made = await emu.invoke_command("music", {"prompt": "beat", "duration": 1.0})
            # Another length: never in one batch with "beat", which must not fail with it.
            failed = await emu.invoke_command("music", {"prompt": "[fail] beat", "duration": 2.0})
            crafted_bad = await crafted(emu, "music", [{"type": 10, "name": "duration", "value": "x"}])
            await answered(emu, made, lambda m: bool(m.attachments))
            await answered(emu, failed, lambda m: "failed" in m.content)
            await answered(emu, crafted_bad)
            await emu.disconnect_gateway()  # a RESUME carries the token too
            await emu.wait_for(lambda: emu.resume_count >= 1, timeout=5)
            assert await child.stop(signal.SIGINT) == 0
        interaction_tokens = [interaction.token for interaction in emu.interactions.values()]
    log = child.log

    assert "DEBUG discord.gateway" in log and "DEBUG discord.http" in log  # everything was logged
    assert "<redacted>" in log  # discord.py logs interaction payloads and webhook URLs at DEBUG
    assert TOKEN not in log and TOKEN.split(".")[2] not in log
    leaked = [line for line in log.splitlines() if any(t[-40:] in line for t in interaction_tokens)]
    assert not leaked, leaked[:3]
    # Nor kept: a delivered job forgets its interaction token.
    assert rows(db_path, "SELECT count(*) FROM jobs WHERE interaction_token IS NOT NULL") == [(0,)]
    assert rows(db_path, "SELECT count(*) FROM pending_requests") == [(0,)]


async def test_a_rejected_token_is_not_shown_even_at_debug_level(db_path: Path, tmp_path: Path) -> None:
    async with DiscordEmulator(max_lifetime=60) as emu:
        env = {**child_env(emu, db_path), "DISCORD_TOKEN": TOKEN}
        async with child_bot(emu, env, "-v", cwd=tmp_path, ready=False) as child:
            code = await child.finish()

    assert code == 2 and "musicbot: Discord rejected DISCORD_TOKEN (401 Unauthorized)" in child.log
    assert "DEBUG" in child.log and TOKEN not in child.log and TOKEN.split(".")[2] not in child.log
