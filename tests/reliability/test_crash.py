"""SIGKILL at each point of a job's life, then a restart on the same database: every accepted job is
delivered exactly once (in its reply, or in the channel once the interaction has expired), and a
request caught before it was queued is told so, with nothing counted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.bot.harness import reply
from tests.discord_emulator import DiscordEmulator, EmulatedInteraction, StoredMessage
from tests.reliability.harness import answered, child_bot, child_env, rows

RESULT_TIMEOUT = 20.0


def states(db_path: Path) -> dict[int, tuple[str, int, bool]]:
    """Job id: (state, attempts, delivered)."""
    found = rows(db_path, "SELECT id, state, attempts, delivered_at IS NOT NULL FROM jobs ORDER BY id")
    return {row[0]: (row[1], row[2], bool(row[3])) for row in found}


async def all_delivered(db_path: Path, count: int, timeout: float = RESULT_TIMEOUT) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while True:
            found = states(db_path)
            if len(found) == count and all(delivered for _, _, delivered in found.values()):
                return
            await asyncio.sleep(0.05)


async def result_in_reply(emu: DiscordEmulator, interaction: EmulatedInteraction) -> StoredMessage:
    return await answered(emu, interaction, lambda m: bool(m.attachments), timeout=RESULT_TIMEOUT)


def shown(message: StoredMessage) -> list[str]:
    return [str(version.get("content") or "") for version in message.versions] + [message.content]


async def test_killed_while_one_job_runs_one_waits_and_one_is_being_queued(
    emu: DiscordEmulator, db_path: Path, tmp_path: Path
) -> None:
    env = child_env(emu, db_path, MUSICBOT_MAX_BATCH="1")
    runner, waiter, latecomer = emu.member, emu.add_user("waiter"), emu.add_user("latecomer")
    stall = ["--hold", "running one", "--stall", "submit:being queued"]
    async with child_bot(emu, env, *stall, cwd=tmp_path) as child:
        running = await emu.invoke_command("music", {"prompt": "running one", "duration": 2.0}, user=runner)
        await child.line("generating running one")
        waiting = await emu.invoke_command("music", {"prompt": "waiting one", "duration": 3.0}, user=waiter)
        await answered(emu, waiting, lambda m: "position 1" in m.content)
        caught = await emu.invoke_command("music", {"prompt": "being queued"}, user=latecomer)
        await child.line("stalled submit")
        before = states(db_path)
        pending = rows(db_path, "SELECT id FROM pending_requests")
        await child.kill()

    assert child.process.returncode == -9
    assert before == {1: ("running", 1, False), 2: ("queued", 0, False)}
    assert pending == [(caught.id,)]

    async with child_bot(emu, env, cwd=tmp_path) as child:
        first = await result_in_reply(emu, running)
        second = await result_in_reply(emu, waiting)
        told = await answered(emu, caught, lambda m: "restarted" in m.content)
        await all_delivered(db_path, 2)
        assert await child.stop() == 0

    # Each job is answered in its own reply, once.
    for interaction, message in ((running, first), (waiting, second)):
        assert emu.interaction_messages(interaction) == [message]
        assert not any("failed" in text for text in shown(message))
    assert "“running one”" in first.content and "“waiting one”" in second.content
    # The interrupted job counted one more attempt; the waiting one ran once.
    assert states(db_path) == {1: ("done", 2, True), 2: ("done", 1, True)}
    # The request caught mid-queueing: told to ask again, nothing made, nothing counted.
    assert told.content.startswith("❌ I restarted before your request was queued")
    assert "nothing was counted" in told.content and not told.attachments
    assert rows(db_path, "SELECT count(*) FROM pending_requests") == [(0,)]
    assert rows(db_path, "SELECT count(*) FROM jobs WHERE user_id = ?", (latecomer.id,)) == [(0,)]
    assert emu.violations == []


async def test_killed_after_generating_or_after_sending_each_result_is_delivered_once(
    emu: DiscordEmulator, db_path: Path, tmp_path: Path
) -> None:
    env = child_env(emu, db_path)
    stall = ["--stall", "deliver:made, not sent", "--stall", "delivered:sent, not recorded"]
    async with child_bot(emu, env, *stall, cwd=tmp_path) as child:
        made = await emu.invoke_command("music", {"prompt": "made, not sent", "duration": 2.0})
        sent = await emu.invoke_command(
            "music", {"prompt": "sent, not recorded", "duration": 2.0}, user=emu.add_user("other")
        )
        await child.line("stalled deliver")
        await child.line("stalled delivered")
        before = states(db_path)
        made_before, sent_before = reply(emu, made), await result_in_reply(emu, sent)
        await child.kill()

    assert before == {1: ("done", 1, False), 2: ("done", 1, False)}
    assert made_before is not None and not made_before.attachments  # nothing sent yet
    sent_files = sent_before.attachments

    async with child_bot(emu, env, cwd=tmp_path) as child:
        await all_delivered(db_path, 2)
        made_after = await result_in_reply(emu, made)
        assert await child.stop() == 0
    sent_after = reply(emu, sent)

    assert "“made, not sent”" in made_after.content and len(made_after.attachments) == 1
    # Sent before the kill: sent again into the same reply (an edit), so the user still sees one result.
    assert sent_after is not None and len(sent_after.attachments) == len(sent_files) == 1
    assert emu.interaction_messages(made) == [made_after] and emu.interaction_messages(sent) == [sent_after]
    assert not [m for m in emu.channel_messages() if m.attachments and m.interaction_id is None]
    assert states(db_path) == {1: ("done", 1, True), 2: ("done", 1, True)}
    assert emu.violations == []


async def test_after_the_interaction_expired_results_go_to_the_channel_once_even_if_killed_after_posting(
    db_path: Path, tmp_path: Path
) -> None:
    lifetime = 2.0
    async with DiscordEmulator(token_lifetime=lifetime, max_lifetime=90) as emu:
        env = child_env(emu, db_path, MUSICBOT_MAX_BATCH="1")
        expiry = ["--lifetime", str(lifetime)]
        asker, other = emu.member, emu.add_user("other")
        async with child_bot(emu, env, *expiry, "--hold", "late one", cwd=tmp_path) as child:
            asked_at = time.monotonic()
            first = await emu.invoke_command("music", {"prompt": "late one", "duration": 2.0}, user=asker)
            await child.line("generating late one")
            second = await emu.invoke_command("music", {"prompt": "late two", "duration": 2.0}, user=other)
            await answered(emu, second, lambda m: "position 1" in m.content)
            await child.kill()

        # Down for longer than the interactions live: their replies can no longer be edited.
        await asyncio.sleep(max(0.0, asked_at + lifetime + 0.2 - time.monotonic()))
        stall = ["--stall", "delivered:late one"]
        async with child_bot(emu, env, *expiry, *stall, cwd=tmp_path) as child:
            await child.line("stalled delivered 1")
            posted_before_kill = [m for m in emu.channel_messages() if m.attachments]
            await child.kill()

        async with child_bot(emu, env, *expiry, cwd=tmp_path) as child:
            await all_delivered(db_path, 2)
            assert await child.stop() == 0

        results = [m for m in emu.channel_messages() if m.attachments]
        status = [reply(emu, first), reply(emu, second)]

    # The first result was posted, then the bot was killed before recording that.
    assert sum("“late one”" in m.content for m in posted_before_kill) == 1
    # One result per job, each a channel message that pings only its requester.
    assert sorted(m.content.split("\n")[1] for m in results) == ["🎵 “late one”", "🎵 “late two”"]
    assert {frozenset(m.pinged_user_ids) for m in results} == {
        frozenset({asker.id}),
        frozenset({other.id}),
    }
    assert all(m.interaction_id is None for m in results)
    assert all(message is not None and "is done" in message.content for message in status)
    assert states(db_path) == {1: ("done", 2, True), 2: ("done", 1, True)}
    assert emu.violations == []
