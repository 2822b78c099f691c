"""The fleet's figures, as a script (not a test): ``python -m tests.fleet.bench``.

Runs real bot processes (shards) and worker processes on a fresh PostgreSQL database and the
Discord emulator, with fake engines of a fixed cost per step, and prints:

1. 300 ``/music`` requests from 30 users through 2 bot processes and 3 workers: lost, answered
   twice, the limits, the order, and how fast each interaction was acknowledged;
2. then a worker SIGKILLed mid-batch and a bot SIGKILLed mid-delivery: lost, twice, takeover time;
3. throughput with 1, 2 and 4 workers (jobs per minute, and the ratio to one worker).

It writes the figures to ``fleet-results.json``. It needs the PostgreSQL server the tests use
(``MUSICBOT_TEST_POSTGRES``) and takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from generation.cold_bench import cpu_name
from tests.databases import fresh_postgres, query
from tests.discord_emulator import DiscordEmulator, EmulatedInteraction
from tests.fleet.harness import Fleet, percentile
from tests.reliability.harness import answered


async def ask_all(
    emu: DiscordEmulator, users: list[Any], asks: int, prefix: str, *, shards: int = 2, pace: float = 0.0
) -> list[EmulatedInteraction]:
    """Every user asks ``asks`` times, users interleaved, the requests spread over the shards, one
    every ``pace`` seconds."""
    asked = []
    for take in range(asks):
        for i, user in enumerate(users):
            options = {"prompt": f"{prefix} user{i} take{take}", "duration": 2.0}
            asked.append(await emu.invoke_command("music", options, user=user, shard=(i + take) % shards))
            if pace:
                await asyncio.sleep(pace)
    return asked


def first_reply(message: Any) -> bool:
    return (
        "position" in message.content
        or "generating" in message.content
        or message.ephemeral
        or bool(message.attachments)
    )


async def many_requests(
    work: Path, users_count: int = 30, asks: int = 10, allowed: int = 8
) -> dict[str, Any]:
    settings = {
        "MUSICBOT_DAILY_SECONDS_PER_USER": str(2 * allowed),
        "MUSICBOT_MAX_QUEUED_PER_USER": str(asks),
        "MUSICBOT_QUEUE_SIZE": "1000",
        "MUSICBOT_MAX_BATCH": "4",
    }
    async with fresh_postgres() as url, DiscordEmulator(max_lifetime=600) as emu:
        fleet = Fleet(emu, url, work, steps=4, step_seconds=0.05, settings=settings)
        users = [emu.add_user(f"user{i}") for i in range(users_count)]
        try:
            async with fleet.bot(0), fleet.bot(1):
                injected = time.monotonic()
                asked = await ask_all(emu, users, asks, "load", pace=0.03)
                injected = time.monotonic() - injected
                replies = [await answered(emu, i, first_reply, timeout=60) for i in asked]
                accepted = sum(not reply.ephemeral for reply in replies)
                # The workers start once every request is in, so every claim chooses among all of
                # them and the order can be checked: each user's k-th job before anyone's (k+1)-th.
                await asyncio.gather(*(fleet.start_worker(f"worker{n}") for n in range(3)))
                began = time.monotonic()
                await fleet.all_delivered(accepted, timeout=300)
                took = time.monotonic() - began
                await asyncio.sleep(1.0)  # a second delivery would come now
        finally:
            await fleet.close()
        jobs = await query(url, "SELECT user_id, turn, owner_id, worker_id FROM jobs ORDER BY id")
        results = fleet.results_per_prompt()
        acks = sorted(latency for i in asked if (latency := emu.ack_latency(i)) is not None)
        violations = len(emu.violations)
    per_user: dict[int, int] = defaultdict(int)
    turns: dict[int, list[int]] = defaultdict(list)
    for user_id, turn, *_ in jobs:
        turns[per_user[user_id]].append(turn)
        per_user[user_id] += 1
    refused = [reply for reply in replies if reply.ephemeral]
    return {
        "requests": len(asked),
        "users": users_count,
        "accepted": len(jobs),
        "refused_daily_seconds": sum("daily_seconds" in reply.content for reply in refused),
        "refused_other": sum("daily_seconds" not in reply.content for reply in refused),
        "lost": sum(1 for prompt, n in results.items() if n == 0) + max(0, len(jobs) - len(results)),
        "delivered_twice": sum(1 for n in results.values() if n > 1),
        "limits_exact": sorted(set(per_user.values())) == [allowed],
        # Round-robin with batches: no user's (k+2)-th job is claimed before anyone's k-th.
        "fair": all(max(turns[k]) <= min(turns[k + 2]) for k in range(allowed - 2)),
        "injected_in_s": round(injected, 1),
        "bots_delivering": len({owner for *_, owner, _ in jobs}),
        "workers_generating": len({worker for *_, worker in jobs}),
        "seconds_to_serve_all": round(took, 1),
        "ack_p50_ms": round(1000 * percentile(acks, 0.5), 1),
        "ack_p99_ms": round(1000 * percentile(acks, 0.99), 1),
        "ack_max_ms": round(1000 * max(acks), 1),
        "violations": violations,
    }


async def kills(work: Path, requests: int = 40) -> dict[str, Any]:
    settings = {
        "MUSICBOT_MAX_QUEUED_PER_USER": "20",
        "MUSICBOT_MAX_BATCH": "2",
        "MUSICBOT_QUEUE_SIZE": "500",
        "MUSICBOT_LEASE": "1",  # takeovers take about one lease
    }
    async with fresh_postgres() as url, DiscordEmulator(max_lifetime=600) as emu:
        fleet = Fleet(emu, url, work, steps=10, step_seconds=0.1, settings=settings)
        users = [emu.add_user(f"user{i}") for i in range(8)]
        try:
            async with fleet.bot(0), fleet.bot(1, "--stall", "delivered:victim") as doomed:
                workers = await asyncio.gather(*(fleet.start_worker(f"worker{n}") for n in range(3)))
                asked = [
                    await emu.invoke_command(
                        "music",
                        {"prompt": "victim" if n == 0 else f"kill song {n}", "duration": 2.0},
                        user=users[n % len(users)],
                        shard=1 if n == 0 else n % 2,
                    )
                    for n in range(requests)
                ]
                for interaction in asked:
                    await answered(emu, interaction, first_reply, timeout=60)
                victim = workers[0]
                await victim.line("generating")
                victim.process.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                worker_takeover = await retaken(url, victim.id, killed)
                await doomed.line("stalled delivered")
                await doomed.kill()
                bot_killed = time.monotonic()
                bot_takeover = await delivered_after(url, "victim", bot_killed)
                await fleet.all_delivered(requests, timeout=300)
                await asyncio.sleep(1.0)
        finally:
            await fleet.close()
        jobs = await query(url, "SELECT state, attempts FROM jobs")
        results = fleet.results_per_prompt()
        violations = len(emu.violations)
    return {
        "requests": requests,
        "done": sum(1 for state, _ in jobs if state == "done"),
        "lost": requests - len(results),
        "delivered_twice": sum(1 for n in results.values() if n > 1),
        "jobs_run_twice_after_the_worker_kill": sum(1 for _, attempts in jobs if attempts == 2),
        "worker_takeover_s": round(worker_takeover, 2),
        "bot_takeover_s": round(bot_takeover, 2),
        "violations": violations,
    }


async def retaken(url: str, worker_id: str, since: float) -> float:
    running = "SELECT id FROM jobs WHERE worker_id = ? AND state = 'running'"
    async with asyncio.timeout(60):
        while True:
            if not await query(url, running, worker_id):
                return time.monotonic() - since
            await asyncio.sleep(0.05)


async def delivered_after(url: str, prompt: str, since: float) -> float:
    sql = "SELECT delivered_at FROM jobs WHERE request LIKE ? AND delivered_at IS NOT NULL"
    async with asyncio.timeout(60):
        while True:
            if await query(url, sql, f'%"prompt": "{prompt}"%'):
                return time.monotonic() - since
            await asyncio.sleep(0.05)


async def throughput(work: Path, workers: int, jobs: int, step_seconds: float, steps: int) -> dict[str, Any]:
    settings = {
        "MUSICBOT_MAX_QUEUED_PER_USER": "50",
        "MUSICBOT_MAX_BATCH": "4",
        "MUSICBOT_QUEUE_SIZE": "1000",
    }
    async with fresh_postgres() as url, DiscordEmulator(max_lifetime=600) as emu:
        fleet = Fleet(emu, url, work, steps=steps, step_seconds=step_seconds, settings=settings)
        users = [emu.add_user(f"user{i}") for i in range(24)]
        try:
            async with fleet.bot(0), fleet.bot(1):
                await asyncio.gather(*(fleet.start_worker(f"worker{n}") for n in range(workers)))
                began = time.monotonic()
                asked = await ask_all(emu, users, jobs // len(users), f"w{workers}")
                await fleet.all_delivered(len(asked), timeout=600)
                took = time.monotonic() - began
        finally:
            await fleet.close()
    return {
        "workers": workers,
        "jobs": len(asked),
        "seconds": round(took, 2),
        "jobs_per_minute": round(60 * len(asked) / took, 1),
    }


async def main(jobs: int, step_seconds: float, steps: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {cpu_name()}"}
    with tempfile.TemporaryDirectory() as work:
        print("300 requests, 30 users, 2 bot processes, 3 workers ...", flush=True)
        figures["many_requests"] = await many_requests(Path(work))
        print(json.dumps(figures["many_requests"], indent=2), flush=True)
        print("a worker SIGKILLed mid-batch, a bot SIGKILLed mid-delivery ...", flush=True)
        figures["kills"] = await kills(Path(work))
        print(json.dumps(figures["kills"], indent=2), flush=True)
        figures["throughput"] = []
        for workers in (1, 2, 4):
            print(f"throughput with {workers} worker(s) ...", flush=True)
            figures["throughput"].append(await throughput(Path(work), workers, jobs, step_seconds, steps))
    one = figures["throughput"][0]["jobs_per_minute"]
    print()
    print(
        f"fake engine: {steps} steps of {step_seconds * 1000:.0f} ms per batch (batches of up to 4);"
        f" {jobs} jobs"
    )
    print("| workers | jobs | seconds | jobs per minute | vs one worker |")
    print("|---|---|---|---|---|")
    for row in figures["throughput"]:
        print(
            f"| {row['workers']} | {row['jobs']} | {row['seconds']} | {row['jobs_per_minute']} |"
            f" {row['jobs_per_minute'] / one:.2f}x |"
        )
    return figures


def write(out: Path, figures: dict[str, Any]) -> None:
    out.write_text(json.dumps(figures, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("fleet-results.json"))
    parser.add_argument("--jobs", type=int, default=96, help="jobs per throughput run (default 96)")
    parser.add_argument("--step-ms", type=float, default=50.0, help="fake step cost (default 50 ms)")
    parser.add_argument("--steps", type=int, default=20, help="fake steps per batch (default 20)")
    args = parser.parse_args()
    write(args.output, asyncio.run(main(args.jobs, args.step_ms / 1000, args.steps)))
