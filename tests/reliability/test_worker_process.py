"""``musicbot run`` on a SQLite file runs its generation worker as a process of its own: a worker that
is killed, or hangs, is replaced, the bot answers meanwhile, and the job is finished by the new one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.discord_emulator import DiscordEmulator
from tests.reliability.harness import answered, child_bot, child_env, rows


def live_worker(db_path: Path) -> tuple[str, int]:
    [(worker_id, pid)] = rows(db_path, "SELECT id, pid FROM workers WHERE stopped_at IS NULL")
    return worker_id, pid


async def test_a_worker_killed_by_hand_is_replaced_and_the_job_finished_while_the_bot_answers(
    emu: DiscordEmulator, db_path: Path, tmp_path: Path
) -> None:
    env = child_env(emu, db_path)
    async with child_bot(emu, env, "--step-seconds", "0.5", cwd=tmp_path) as child:
        asked = await emu.invoke_command("music", {"prompt": "slow one", "duration": 2.0})
        await child.line("generating slow one")
        first, pid = live_worker(db_path)
        os.kill(pid, signal.SIGKILL)
        queue = await emu.invoke_command("queue")
        listed = await answered(emu, queue)  # the bot answers while it has no worker
        result = await answered(emu, asked, lambda m: bool(m.attachments), timeout=30)
        second, _ = live_worker(db_path)
        assert await child.stop() == 0

    assert listed.ephemeral and "#1 music, 2 s, “slow one”" in listed.content
    assert "“slow one”" in result.content
    assert second != first
    assert f"({first}) was killed by SIGKILL; starting a new one" in child.log
    assert rows(db_path, "SELECT state, attempts FROM jobs") == [("done", 2)]
    assert emu.violations == []


async def test_a_hung_worker_is_killed_and_replaced(
    emu: DiscordEmulator, db_path: Path, tmp_path: Path
) -> None:
    env = child_env(emu, db_path, MUSICBOT_LEASE="2")
    async with child_bot(emu, env, "--step-seconds", "0.5", cwd=tmp_path) as child:
        asked = await emu.invoke_command("music", {"prompt": "stuck one", "duration": 2.0})
        await child.line("generating stuck one")
        first, pid = live_worker(db_path)
        os.kill(pid, signal.SIGSTOP)  # alive but silent, as in a native call that never returns
        result = await answered(emu, asked, lambda m: bool(m.attachments), timeout=30)
        assert await child.stop() == 0

    assert "“stuck one”" in result.content
    assert f"worker {first} has not answered for" in child.log
    assert rows(db_path, "SELECT state, attempts FROM jobs") == [("done", 2)]
    assert emu.violations == []
