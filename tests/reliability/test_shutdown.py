"""SIGTERM or Ctrl-C: no new jobs, the running one put back in the queue (no attempt counted), status
messages current, the database closed cleanly (WAL emptied); the next start finishes every job."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.discord_emulator import DiscordEmulator
from tests.reliability.harness import (
    FaultyModels,
    answered,
    bot_running,
    child_bot,
    child_env,
    rows,
    settings_for,
    wal_bytes,
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
async def test_a_signal_stops_the_bot_in_order_and_the_next_start_finishes_every_job(
    emu: DiscordEmulator, db_path: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    env = child_env(emu, db_path, MUSICBOT_MAX_BATCH="1")
    async with child_bot(emu, env, "--hold", "long one", cwd=tmp_path) as child:
        running = await emu.invoke_command("music", {"prompt": "long one", "duration": 2.0})
        await child.line("generating long one")
        waiting = await emu.invoke_command(
            "music", {"prompt": "next one", "duration": 2.0}, user=emu.add_user("other")
        )
        await answered(emu, waiting, lambda m: "position 1" in m.content)
        code = await child.stop(sig, timeout=15)
    after_stop = rows(db_path, "SELECT id, state, attempts FROM jobs ORDER BY id")
    integrity = rows(db_path, "PRAGMA integrity_check")

    assert code == 0
    assert f"{sig.name}: stopping" in child.log and "job service closed; 2 jobs wait" in child.log
    assert "Traceback" not in child.log
    # Both wait for the next start; being interrupted by a shutdown costs the job no attempt.
    assert after_stop == [(1, "queued", 0), (2, "queued", 0)]
    assert integrity == [("ok",)] and wal_bytes(db_path) == 0

    async with child_bot(emu, env, cwd=tmp_path) as child:
        first = await answered(emu, running, lambda m: bool(m.attachments))
        second = await answered(emu, waiting, lambda m: bool(m.attachments))
        assert await child.stop() == 0

    assert "“long one”" in first.content and "“next one”" in second.content
    assert emu.violations == []


async def test_while_stopping_new_commands_are_told_to_try_again_and_nothing_is_queued(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels
) -> None:
    async with bot_running(emu, settings_for(db_path, emu.guild_id), models) as bot:
        # ``musicbot run`` closes the service first, while the gateway is still connected.
        await bot.service.close()
        refused = await answered(emu, await emu.invoke_command("music", {"prompt": "too late"}))
        usage = await bot.service.usage(emu.member.id)

    assert refused.ephemeral
    assert refused.content == "❌ The music queue is restarting; try again in a minute."
    assert usage.active_jobs == 0 and usage.seconds_used == 0
    assert rows(db_path, "SELECT count(*) FROM jobs") == [(0,)]
    assert rows(db_path, "SELECT count(*) FROM pending_requests") == [(0,)]
    assert emu.violations == []


async def test_a_second_signal_stops_at_once(emu: DiscordEmulator, db_path: Path, tmp_path: Path) -> None:
    env = child_env(emu, db_path)
    async with child_bot(emu, env, cwd=tmp_path) as child:
        child.process.send_signal(signal.SIGTERM)
        child.process.send_signal(signal.SIGTERM)
        code = await child.finish()

    assert code in (0, 130) and "Traceback" not in child.log
    assert rows(db_path, "PRAGMA integrity_check") == [("ok",)]
