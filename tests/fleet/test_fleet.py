"""Many processes on one PostgreSQL database: two bot processes (shards) and three workers, all real
processes on loopback. No request is lost or answered twice, the limits hold exactly, the order is
fair, and the SIGKILL of a worker mid-batch or of a bot mid-delivery changes none of that."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from pathlib import Path

from tests.databases import fresh_postgres, query
from tests.discord_emulator import DiscordEmulator, StoredMessage
from tests.fleet.harness import Fleet
from tests.reliability.harness import answered

USERS = 12
ASKS = 5
ALLOWED = 4  # each user's daily seconds fit four 2 s tracks: the fifth request is refused


async def test_requests_through_two_bots_and_three_workers_are_answered_once_fairly_within_limits(
    tmp_path: Path,
) -> None:
    settings = {
        "MUSICBOT_DAILY_SECONDS_PER_USER": str(2 * ALLOWED),
        "MUSICBOT_MAX_QUEUED_PER_USER": "10",
        "MUSICBOT_QUEUE_SIZE": "500",
        "MUSICBOT_MAX_BATCH": "4",
    }
    async with fresh_postgres() as url, DiscordEmulator(max_lifetime=120) as emu:
        fleet = Fleet(emu, url, tmp_path, steps=6, step_seconds=0.05, settings=settings)
        users = [emu.add_user(f"user{i}") for i in range(USERS)]
        try:
            async with fleet.bot(0), fleet.bot(1):
                asked = []
                for take in range(ASKS):
                    for i, user in enumerate(users):
                        options = {"prompt": f"user{i} take{take}", "duration": 2.0}
                        shard = (i + take) % 2  # each user's requests reach both bot processes
                        asked.append(await emu.invoke_command("music", options, user=user, shard=shard))
                replies = [
                    await answered(emu, i, lambda m: "position" in m.content or m.ephemeral) for i in asked
                ]
                # Workers start once every request is in: every claim then chooses among all of them.
                await asyncio.gather(*(fleet.start_worker(f"worker{n}") for n in range(3)))
                await fleet.all_delivered(USERS * ALLOWED)
                await asyncio.sleep(0.5)  # any second delivery would come now
        finally:
            await fleet.close()
        jobs = await query(
            url, "SELECT user_id, request, turn, state, owner_id, worker_id FROM jobs ORDER BY id"
        )
        results = fleet.results_per_prompt()
        violations = list(emu.violations)

    refused = [reply for reply in replies if reply.ephemeral]
    assert len(refused) == USERS and all("daily_seconds" in reply.content for reply in refused)
    per_user: dict[int, int] = defaultdict(int)
    for user_id, *_ in jobs:
        per_user[user_id] += 1
    assert sorted(per_user.values()) == [ALLOWED] * USERS  # exact: never one more, never one fewer
    assert {state for *_, state, _owner, _worker in jobs} == {"done"}
    assert len({owner for *_, owner, _worker in jobs}) == 2  # both bot processes delivered
    assert len({worker for *_, worker in jobs}) == 3  # and all three workers generated
    # Every accepted request has exactly one message with its audio; no refused one has any.
    assert sum(results.values()) == USERS * ALLOWED and set(results.values()) == {1}
    # Fair: users take turns (batches of four whole rounds here): every user's k-th job was claimed
    # no later than anyone's (k+1)-th.
    turns: dict[int, list[int]] = defaultdict(list)
    seen: dict[int, int] = defaultdict(int)
    for user_id, _request, turn, *_ in jobs:
        turns[seen[user_id]].append(turn)
        seen[user_id] += 1
    assert all(max(turns[k]) <= min(turns[k + 1]) for k in range(ALLOWED - 1))
    assert violations == []


async def test_a_worker_killed_mid_batch_and_a_bot_killed_mid_delivery_lose_and_repeat_nothing(
    tmp_path: Path,
) -> None:
    settings = {"MUSICBOT_MAX_QUEUED_PER_USER": "10", "MUSICBOT_MAX_BATCH": "2"}
    async with fresh_postgres() as url, DiscordEmulator(max_lifetime=120) as emu:
        fleet = Fleet(emu, url, tmp_path, steps=10, step_seconds=0.1, settings=settings)
        users = [emu.add_user(f"user{i}") for i in range(4)]
        try:
            async with fleet.bot(0), fleet.bot(1, "--stall", "delivered:victim") as doomed:
                first = await fleet.start_worker("first")
                await fleet.start_worker("second")
                asked = [
                    await emu.invoke_command(
                        "music",
                        {"prompt": "victim" if n == 0 else f"song {n}", "duration": 2.0},
                        user=users[n % 4],
                        shard=1 if n == 0 else n % 2,
                    )
                    for n in range(10)
                ]
                for interaction in asked:
                    await answered(emu, interaction, lambda m: "Job #" in m.content)
                line = await first.line("generating")
                first.process.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                await first.process.wait()
                taken_over = await _retaken(url, "first", killed_at)
                await fleet.start_worker("third")
                await doomed.line("stalled delivered")
                await doomed.kill()
                await fleet.all_delivered(10)
                await asyncio.sleep(0.5)
        finally:
            await fleet.close()
        jobs = await query(url, "SELECT request, state, attempts, owner_id FROM jobs ORDER BY id")
        results = fleet.results_per_prompt()
        violations = list(emu.violations)

    assert line.startswith("generating")
    assert [state for _, state, *_ in jobs] == ["done"] * 10
    assert max(attempts for _, _, attempts, _ in jobs) == 2  # the killed worker's batch ran again
    assert sum(results.values()) == 10 and set(results.values()) == {1}
    assert taken_over < 5.0
    assert violations == []


def _showed_progress(message: StoredMessage) -> bool:
    """Whether the message says, or once said, how far its generation had come."""
    return any(" %" in str(version.get("content")) for version in [*message.versions, message.data])


async def _retaken(url: str, worker_id: str, since: float) -> float:
    """Seconds from ``since`` until no job runs under ``worker_id`` any more (its lease ran out)."""
    running = "SELECT id FROM jobs WHERE worker_id = ? AND state = 'running'"
    async with asyncio.timeout(30):
        while True:
            if not await query(url, running, worker_id):
                break
            await asyncio.sleep(0.05)
    return time.monotonic() - since


async def test_cancel_and_progress_cross_processes_and_a_restart_takes_no_running_job(tmp_path: Path) -> None:
    async with fresh_postgres() as url, DiscordEmulator(max_lifetime=120) as emu:
        # 8 s a batch: "kept" still runs while a second worker and a second bot start on a slow machine.
        fleet = Fleet(emu, url, tmp_path, steps=80, step_seconds=0.1)
        other = emu.add_user("other")
        try:
            async with fleet.bot(0):
                worker = await fleet.start_worker("worker")
                kept = await emu.invoke_command("music", {"prompt": "kept", "duration": 2.0}, shard=0)
                await worker.line("generating kept")
                # Another worker and another bot start while "kept" runs: neither takes it.
                await fleet.start_worker("late worker")
                async with fleet.bot(1):
                    progress = await answered(emu, kept, _showed_progress)
                    doomed = await emu.invoke_command(
                        "music", {"prompt": "doomed", "duration": 3.0}, user=other, shard=0
                    )
                    await fleet.workers[1].line("generating doomed")
                    # Its owner cancels it through the other bot process; the worker stops it.
                    cancel = await emu.invoke_command("cancel", {"job": 2}, user=other, shard=1)
                    said = await answered(emu, cancel)
                    stopped = await answered(emu, doomed, lambda m: "cancelled" in m.content)
                    await fleet.all_delivered(1)
        finally:
            await fleet.close()
        jobs = await query(url, "SELECT id, state, attempts, worker_id, owner_id FROM jobs ORDER BY id")
        violations = list(emu.violations)

    # Progress from a worker process, shown by the bot that owns the reply (its edits, oldest first).
    shown = [str(version.get("content")) for version in progress.versions]
    assert any("generating" in text and " %" in text for text in shown)
    assert said.content == "Cancelled job #2."
    assert stopped.content.startswith("🚫 Job #2")
    (_, kept_state, kept_attempts, kept_worker, _), (_, doomed_state, *_) = jobs
    assert (kept_state, kept_attempts, kept_worker) == ("done", 1, "worker")
    assert doomed_state == "cancelled"
    assert violations == []
