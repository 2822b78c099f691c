"""500 /music interactions from 50 users in under 10 seconds, through the emulator, with a fast fake
generator: every one acknowledged in time, limits exact, the queue bound kept, every accepted job
delivered, and the event loop never stalled.

Three waves. While generation is held: 10 users send 4 requests each (max_queued 3: exactly 3 are
taken, the 4th is refused), then 40 other users send one each (queue_size 40: exactly 10 more fit,
30 hear "the queue is full"). Then generation runs and the other 420 requests come at a steady rate
from all 50 users, under the same limits plus daily_seconds (6 tracks of 10 s each per user).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import soundfile as sf

from bot.runner import freeze_startup_objects
from bot.settings import Limits
from tests.bot.harness import reply
from tests.discord_emulator import DiscordEmulator, EmulatedInteraction, EmuUser
from tests.reliability.harness import FaultyModels, LoopWatch, bot_running, rows, settings_for

USERS = 50
PER_USER = 10
TOTAL = USERS * PER_USER
MAX_QUEUED = 3
QUEUE_SIZE = 40
DURATION = 10.0
DAILY_SECONDS = 60
INJECT_WITHIN = 10.0
ACK_DEADLINE = 3.0
LOOP_STALL_LIMIT = 0.1
SAMPLE_RATE = 8000

Sent = tuple[EmuUser, EmulatedInteraction]
REFUSALS = {
    "max_queued": "(max_queued)",
    "queue_size": "The queue is full",
    "daily_seconds": "(daily_seconds)",
}


def outcome(emu: DiscordEmulator, interaction: EmulatedInteraction) -> str | None:
    """'result', a refusal's limit, or None while unanswered."""
    message = reply(emu, interaction)
    if message is None or message.loading:
        return None
    if message.attachments:
        return "result"
    if message.ephemeral:
        found = [limit for limit, text in REFUSALS.items() if text in message.content]
        return found[0] if len(found) == 1 else f"unexpected: {message.content}"
    return None


async def send(emu: DiscordEmulator, user: EmuUser, sent: list[Sent]) -> EmulatedInteraction:
    interaction = await emu.invoke_command(
        "music", {"prompt": f"{user.name} song", "duration": DURATION}, user=user
    )
    sent.append((user, interaction))
    return interaction


def queued_or_refused(emu: DiscordEmulator, interaction: EmulatedInteraction) -> bool:
    message = reply(emu, interaction)
    return message is not None and not message.loading and ("Job #" in message.content or message.ephemeral)


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - polls the emulator and the database
            await asyncio.sleep(0.05)


@contextlib.contextmanager
def frozen_startup() -> Iterator[None]:
    """What ``musicbot run`` does once started (without it, a full GC pass stalls the loop 150-300 ms
    when torch is loaded, as it is in the bot and in a whole test run)."""
    freeze_startup_objects()
    try:
        yield
    finally:
        gc.unfreeze()


def most_at_once(spans: list[tuple[str, str]]) -> int:
    """The most spans (created, finished: UTC timestamps of fixed width) open at one moment."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = open_now = 0
    for _, step in events:
        open_now += step
        most = max(most, open_now)
    return most


async def drive(
    emu: DiscordEmulator, users: list[EmuUser], models: FaultyModels, sent: list[Sent]
) -> tuple[float, float]:
    """The three waves; (seconds taken to inject all 500, seconds until all were answered)."""
    models.hold()
    began = time.monotonic()
    first = [await send(emu, user, sent) for user in users[:10] for _ in range(4)]
    await until(lambda: all(queued_or_refused(emu, i) for i in first))
    second = [await send(emu, user, sent) for user in users[10:]]
    await until(lambda: all(queued_or_refused(emu, i) for i in second))
    models.release()
    counts = Counter(user.id for user, _ in sent)
    third = []
    for _ in range(PER_USER):
        for user in users:
            if counts[user.id] < PER_USER:
                counts[user.id] += 1
                third.append(user)
    # A steady rate, ending a second before the 10 s are up.
    start = time.monotonic()
    interval = (began + INJECT_WITHIN - 1.0 - start) / len(third)
    for n, user in enumerate(third):
        await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
        await send(emu, user, sent)
    injected = time.monotonic() - began
    await until(lambda: all(outcome(emu, i) is not None for _, i in sent))
    return injected, time.monotonic() - began


async def test_500_interactions_from_50_users_are_all_answered_in_time_within_the_limits(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = FaultyModels(steps=2, step_seconds=0.002)
    limits = Limits(max_queued=MAX_QUEUED, daily_seconds=DAILY_SECONDS, max_duration=120)
    sent: list[Sent] = []
    async with DiscordEmulator(max_lifetime=110) as emu:
        users = [emu.add_user(f"user{n:02d}") for n in range(USERS)]
        settings = settings_for(db_path, emu.guild_id, limits=limits, queue_size=QUEUE_SIZE, max_batch=4)
        async with bot_running(emu, settings, models):
            with frozen_startup():
                async with LoopWatch() as watch:
                    injected, finished = await drive(emu, users, models, sent)
        violations = list(emu.violations)
        outcomes = [(user, i, outcome(emu, i)) for user, i in sent]
        latencies = sorted(emu.ack_latency(i) or float("inf") for _, i in sent)
        results = {i.id: reply(emu, i) for _, i, kind in outcomes if kind == "result"}
    stall = watch.max_gap

    jobs = rows(db_path, "SELECT user_id, seconds, state, delivered_at, created_at, finished_at FROM jobs")
    p50, p99 = statistics.quantiles(latencies, n=100)[49], statistics.quantiles(latencies, n=100)[98]
    kinds = Counter(kind for _, _, kind in outcomes)
    with capsys.disabled():
        print(
            f"\nload: {TOTAL} interactions injected in {injected:.1f} s, all answered in {finished:.1f} s;"
            f" ack p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms;"
            f" longest event-loop stall {stall * 1000:.0f} ms; outcomes {dict(kinds)}"
        )

    assert len(sent) == TOTAL and injected < INJECT_WITHIN
    assert violations == []
    assert latencies[-1] < ACK_DEADLINE
    assert stall < LOOP_STALL_LIMIT
    assert set(kinds) <= {"result", *REFUSALS}, kinds

    # Wave 1: each of 10 users gets exactly max_queued jobs and one refusal naming that limit.
    first_kinds = Counter((user.id, kind) for user, i, kind in outcomes[:40])
    assert all(first_kinds[(u.id, "result")] == MAX_QUEUED for u in users[:10])
    assert all(first_kinds[(u.id, "max_queued")] == 1 for u in users[:10])
    # Wave 2: the queue holds exactly queue_size; the rest hear that it is full.
    second_kinds = Counter(kind for _, _, kind in outcomes[40:80])
    assert second_kinds == {"result": QUEUE_SIZE - 10 * MAX_QUEUED, "queue_size": 40 - (QUEUE_SIZE - 30)}

    # Every accepted job is a stored, delivered result of the asked length; nothing else is stored.
    assert len(jobs) == kinds["result"] == len(results)
    assert all(state == "done" and delivered for _, _, state, delivered, _, _ in jobs)
    for message in results.values():
        assert message is not None
        audio, rate = sf.read(io.BytesIO(message.attachment_bytes()), dtype="int16")
        assert rate == SAMPLE_RATE and audio.shape == (int(DURATION * SAMPLE_RATE),)

    # Limits hold exactly: per user, never more than max_queued at once, never past daily_seconds;
    # a daily_seconds refusal came only once the day's seconds were all used.
    per_user: dict[int, list[tuple[float, str, str]]] = defaultdict(list)
    for user_id, seconds, _, _, created, finished_at in jobs:
        per_user[user_id].append((seconds, created, finished_at))
    for user in users:
        mine = per_user[user.id]
        assert sum(seconds for seconds, _, _ in mine) <= DAILY_SECONDS
        assert most_at_once([(c, f) for _, c, f in mine]) <= MAX_QUEUED
        if any(u is user and kind == "daily_seconds" for u, _, kind in outcomes):
            assert sum(seconds for seconds, _, _ in mine) == DAILY_SECONDS
    assert most_at_once([(c, f) for *_, c, f in jobs]) <= QUEUE_SIZE
