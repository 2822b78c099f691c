"""Worker faults and gateway trouble: the job fails with a message (its seconds given back), the worker
is replaced where its state is in doubt, the queue goes on; a dropped gateway loses no job or reply."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.jobs import JobState, JobWorker, open_database
from bot.settings import Settings
from generation import GenerationWorker
from tests.discord_emulator import DiscordEmulator
from tests.jobs.fakes import BUG_PROMPT, DIE_PROMPT, OOM_PROMPT
from tests.reliability.harness import (
    FAIL_MARK,
    HANG_PROMPT,
    MEMORY_PROMPT,
    FaultyModels,
    answered,
    bot_running,
    rows,
    settings_for,
)

JOB_TIMEOUT = 0.5  # seconds per 10 s of audio: a 1 s job may generate for 0.5 s
CANCEL_GRACE = 0.3


@pytest.mark.parametrize(
    ("prompt", "message", "replaced"),
    [
        (f"{FAIL_MARK} drums", "failed: the fake engine was told to fail", False),
        (BUG_PROMPT, "failed: something went wrong in the music generator; it was restarted", True),
        (DIE_PROMPT, "failed: the generation worker stopped (the fake device fell off)", True),
        (OOM_PROMPT, "failed: the model ran out of memory making 1 s of audio; ask for a shorter", False),
        (MEMORY_PROMPT, "failed: the machine ran out of memory making 1 s of audio; ask for a shorter", True),
        (HANG_PROMPT, "failed: making it took longer than its time limit (0.5 s), so it was stopped", True),
    ],
    ids=["raises", "bug", "worker-dies", "gpu-out-of-memory", "host-out-of-memory", "hangs"],
)
async def test_a_faulty_generation_fails_with_a_message_and_the_queue_goes_on(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels, prompt: str, message: str, replaced: bool
) -> None:
    settings = settings_for(db_path, emu.guild_id, max_batch=1, job_timeout=JOB_TIMEOUT)
    unlucky, next_one = emu.member, emu.add_user("next")
    async with bot_running(emu, settings, models, cancel_grace=CANCEL_GRACE) as bot:
        faulty = await emu.invoke_command("music", {"prompt": prompt, "duration": 1.0}, user=unlucky)
        after = await emu.invoke_command("music", {"prompt": "after it", "duration": 1.0}, user=next_one)
        failed = await answered(emu, faulty, lambda m: "failed" in m.content)
        result = await answered(emu, after, lambda m: bool(m.attachments))
        usage = await bot.service.usage(unlucky.id)
        engine = bot.service.worker.engine if bot.service.worker is not None else None
        worker_alive = engine is not None and engine.alive

    assert failed.content.startswith("❌ Job #1 (music, 1 s, ") and message in failed.content
    assert not failed.attachments and "“after it”" in result.content
    # The failed job's seconds are given back.
    assert usage.seconds_used == 0 and usage.active_jobs == 0
    assert rows(db_path, "SELECT state FROM jobs ORDER BY id") == [("failed",), ("done",)]
    assert len(models.loads) == (2 if replaced else 1) and worker_alive
    assert emu.violations == []


async def test_a_generation_past_its_time_limit_that_stops_when_asked_keeps_its_worker(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels
) -> None:
    settings = settings_for(db_path, emu.guild_id, max_batch=1, job_timeout=JOB_TIMEOUT)
    models.hold("too slow")  # it waits, but listens to its cancel event like the real engine
    async with bot_running(emu, settings, models, cancel_grace=CANCEL_GRACE) as bot:
        slow = await emu.invoke_command("music", {"prompt": "too slow", "duration": 1.0})
        after = await emu.invoke_command("music", {"prompt": "quick", "duration": 1.0}, user=emu.owner)
        failed = await answered(emu, slow, lambda m: "failed" in m.content)
        await answered(emu, after, lambda m: bool(m.attachments))
        job = await bot.service.job(1)

    assert "failed: making it took longer than its time limit (0.5 s), so it was stopped" in failed.content
    assert job.state is JobState.FAILED and models.cancels_seen[0] is True
    assert models.loads == ["fake-small"]  # the same worker went on
    assert emu.violations == []


async def test_a_hung_worker_is_left_to_end_alone_and_then_releases_its_model(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels
) -> None:
    settings = settings_for(db_path, emu.guild_id, job_timeout=JOB_TIMEOUT)
    async with bot_running(emu, settings, models, cancel_grace=CANCEL_GRACE):
        stuck = await emu.invoke_command("music", {"prompt": HANG_PROMPT, "duration": 1.0})
        await answered(emu, stuck, lambda m: "failed" in m.content)
        closed_while_stuck = list(models.closed)
        models.unstick.set()  # the stuck call returns at last: its thread releases the model and ends
        async with asyncio.timeout(2):
            while not models.closed:  # noqa: ASYNC110 - the worker thread appends to it
                await asyncio.sleep(0.01)

    assert closed_while_stuck == [] and models.closed[0] == "fake-small"


async def test_closing_with_a_hung_generation_does_not_hang_and_keeps_the_job(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels
) -> None:
    settings = settings_for(db_path, emu.guild_id)
    async with bot_running(emu, settings, models, close_timeout=0.3) as bot:
        await emu.invoke_command("music", {"prompt": HANG_PROMPT, "duration": 1.0})
        await asyncio.to_thread(models.hung.wait, 5)
        began = asyncio.get_running_loop().time()
        await bot.service.close()
        took = asyncio.get_running_loop().time() - began
        job = await bot.service.job(1)

    assert took < 2.0
    # Waiting again for the next start, without an attempt counted against it.
    assert job.state is JobState.QUEUED and job.attempts == 0


async def test_a_gateway_that_drops_and_resumes_loses_no_job_and_no_reply(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels
) -> None:
    settings = settings_for(db_path, emu.guild_id, max_batch=1)
    models.hold()
    async with bot_running(emu, settings, models) as bot:
        users = [emu.add_user(f"user {n}") for n in range(3)]
        before = [
            await emu.invoke_command("music", {"prompt": f"before {n}", "duration": 1.0}, user=user)
            for n, user in enumerate(users)
        ]
        await answered(emu, before[2], lambda m: "position" in m.content)
        await emu.disconnect_gateway()
        # Results are sent over HTTP, so they go out while the gateway is down.
        models.release()
        during = await emu.invoke_command("music", {"prompt": "while down", "duration": 1.0})
        await emu.wait_for(lambda: emu.resume_count >= 1, timeout=5)
        await emu.request_reconnect()  # Discord moving the session: op 7, then RESUME again
        await emu.wait_for(lambda: emu.resume_count >= 2, timeout=5)
        after = await emu.invoke_command("music", {"prompt": "after", "duration": 1.0}, user=emu.owner)
        results = [await answered(emu, i, lambda m: bool(m.attachments)) for i in [*before, during, after]]
        states = [job.state for job in [await bot.service.job(n) for n in range(1, 6)]]

    assert [r.content.split("\n")[0] for r in results] == [
        "🎵 “before 0”",
        "🎵 “before 1”",
        "🎵 “before 2”",
        "🎵 “while down”",
        "🎵 “after”",
    ]
    assert all(len(emu.interaction_messages(i)) == 1 for i in [*before, during, after])
    assert states == [JobState.DONE] * 5 and emu.identify_count == 1
    assert emu.violations == []


async def test_the_time_limit_scales_with_the_audio_asked_for_and_the_measured_speed(db_path: Path) -> None:
    assert Settings.from_env({}).job_timeout == 300
    settings = Settings.from_env({"MUSICBOT_JOB_TIMEOUT": "60"})
    assert settings.job_timeout == 60
    async with open_database(db_path) as db:
        worker = JobWorker(db, settings, lambda: GenerationWorker(FaultyModels()))
        short, long = worker.time_limit(4.0), worker.time_limit(4 * 120.0)
        worker._speed = 2.0  # a slow machine: 2 s of compute per second of audio
        slow = worker.time_limit(4 * 120.0)

    assert short == 60 and long == 60 * 48 and slow == 10 * 2.0 * 480
