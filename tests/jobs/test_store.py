"""The store's promises across processes, on both backends: fair claims, exact limits, leases, fencing,
one owner per job. Each store here has a connection of its own, as each process would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta

import pytest

from bot.jobs import JobKind, JobState, LimitExceeded, Origin, open_database, utc_now
from bot.jobs.models import Job, JobResult
from bot.jobs.store import JobStore, NewJob, StoredTrack, WorkerRow
from bot.settings import Limits
from tests.databases import query, states
from tests.jobs.fakes import request

LEASE = timedelta(seconds=30)


@asynccontextmanager
async def stores(database: str, count: int, limits: Limits | None = None) -> AsyncIterator[list[JobStore]]:
    """``count`` stores on separate connections to one database (the first creates the schema)."""
    async with AsyncExitStack() as stack:
        found = []
        for _ in range(count):
            db = await stack.enter_async_context(open_database(database, checkpoint_every=None))
            found.append(JobStore(db, limits or Limits(max_queued=100, daily_seconds=10**6), queue_size=1000))
        yield found


async def submit(store: JobStore, user: int, prompt: str = "piano", **options: object) -> Job:
    new = NewJob(Origin(user), JobKind.NEW, request(prompt, **options).with_seed(), owner_id="bot-a")  # type: ignore[arg-type]
    return await store.add_job(new, exempt=False, now=utc_now())


async def register(store: JobStore, worker_id: str) -> None:
    now = utc_now()
    await store.register_worker(WorkerRow(worker_id, "host", 1, "cpu", now, now))


async def claim(store: JobStore, worker_id: str, rows: int = 1, *, lease: timedelta = LEASE) -> list[Job]:
    now = utc_now()
    return await store.claim(worker_id, "small", rows, lease_until=now + lease, now=now)


def result() -> JobResult:
    return JobResult(1.0, 8000, (1,), 0.1)


def track(job: Job) -> StoredTrack:
    return StoredTrack(job.id, 0, 1, 8000, 8000, b"fLaC")


async def test_workers_claiming_at_once_serve_users_in_turn_and_never_share_a_job(database: str) -> None:
    async with stores(database, 4) as (bot, *workers):
        for i in range(4):
            for user in (1, 2, 3):
                await submit(bot, user, f"{user}-{i}", duration=1 + user)  # never batched across users
        for index, store in enumerate(workers):
            await register(store, f"w{index}")
        rounds: list[list[Job]] = []
        while True:
            found = await asyncio.gather(*(claim(store, f"w{i}") for i, store in enumerate(workers)))
            batch = [job for jobs in found for job in jobs]
            if not batch:
                break
            rounds.append(batch)

    claimed = [job for batch in rounds for job in batch]
    assert len(claimed) == 12 and len({job.id for job in claimed}) == 12
    # Fair: the three workers claiming at once take one job of each user.
    assert [sorted(job.user_id for job in batch) for batch in rounds] == [[1, 2, 3]] * 4
    for user in (1, 2, 3):
        mine = sorted((job for job in claimed if job.user_id == user), key=lambda job: job.started_at or 0)
        assert [job.request.prompt for job in mine] == [f"{user}-{i}" for i in range(4)]


async def test_whose_turn_it_is_is_shared_by_every_worker(database: str) -> None:
    async with stores(database, 2) as (one, two):
        await register(one, "w1")
        await register(two, "w2")
        for prompt in ("a1", "a2"):
            await submit(one, 1, prompt)
        await submit(one, 2, "b1")
        first = await claim(one, "w1")
        second = await claim(two, "w2")
        third = await claim(one, "w1")

    assert [job.request.prompt for job in first + second + third] == ["a1", "b1", "a2"]


async def test_compatible_jobs_of_several_users_are_claimed_as_one_batch(database: str) -> None:
    async with stores(database, 1) as (store,):
        await register(store, "w")
        for user in (1, 2, 3):
            await submit(store, user, f"song {user}")
        batch = await claim(store, "w", rows=4)

    assert [job.user_id for job in batch] == [1, 2, 3]
    assert {job.worker_id for job in batch} == {"w"} and {job.attempts for job in batch} == {1}


async def test_bots_submitting_at_the_same_instant_never_pass_a_limit_together(database: str) -> None:
    limits = Limits(max_queued=3, daily_seconds=10**6)
    async with stores(database, 4, limits) as bots:

        async def attempt(store: JobStore) -> bool:
            try:
                await submit(store, 7)
            except LimitExceeded:
                return False
            return True

        outcomes = await asyncio.gather(*(attempt(bots[i % 4]) for i in range(40)))

    assert outcomes.count(True) == 3
    assert await query(database, "SELECT count(*) FROM jobs") == [(3,)]


async def test_a_late_result_from_a_worker_presumed_dead_is_refused(database: str) -> None:
    async with stores(database, 2) as (dead, alive):
        await register(dead, "dead")
        await register(alive, "alive")
        job = await submit(dead, 1)
        [stale] = await claim(dead, "dead", lease=timedelta(seconds=-1))  # its lease already ran out
        waiting, failed = await alive.reap(2, utc_now())
        [taken] = await claim(alive, "alive")
        late = await dead.finish_job(stale, result(), "small", [track(stale)], utc_now())
        late_failure = await dead.fail_job(stale, "too late", utc_now())
        done = await alive.finish_job(taken, result(), "small", [track(taken)], utc_now())

    assert [j.id for j in waiting] == [job.id] and failed == []
    assert taken.id == job.id and taken.attempts == 2 and taken.worker_id == "alive"
    assert late is None and late_failure is None
    assert done is not None and done.state is JobState.DONE
    assert await query(database, "SELECT count(*) FROM tracks WHERE job_id = ?", job.id) == [(1,)]


async def test_a_live_workers_renewed_lease_keeps_its_jobs(database: str) -> None:
    async with stores(database, 2) as (worker, other):
        await register(worker, "w")
        job = await submit(worker, 1)
        await claim(worker, "w", lease=timedelta(seconds=1))
        mine = await worker.renew("w", lease_until=utc_now() + LEASE, now=utc_now())
        await asyncio.sleep(1.1)
        waiting, failed = await other.reap(2, utc_now())

    assert mine == {job.id}
    assert waiting == [] and failed == []
    assert (await states(database))[job.id] == "running"


async def test_a_job_whose_worker_died_on_every_attempt_fails_with_a_reason(database: str) -> None:
    async with stores(database, 1) as (store,):
        await register(store, "w")
        job = await submit(store, 1)
        for _ in range(2):
            await claim(store, "w", lease=timedelta(seconds=-1))
            waiting, failed = await store.reap(2, utc_now())
        stored = await store.job(job.id)

    assert waiting == [] and [j.id for j in failed] == [job.id]
    assert stored.state is JobState.FAILED and stored.error is not None and "2 times" in stored.error


async def test_a_cancelled_running_job_is_no_longer_its_workers(database: str) -> None:
    async with stores(database, 2) as (bot, worker):
        await register(worker, "w")
        job = await submit(bot, 1)
        [claimed] = await claim(worker, "w")
        await bot.cancel_job(job.id, utc_now())
        mine = await worker.renew("w", lease_until=utc_now() + LEASE, now=utc_now())
        late = await worker.finish_job(claimed, result(), "small", [track(claimed)], utc_now())

    assert mine == set() and late is None
    assert (await states(database))[job.id] == "cancelled"


async def test_jobs_of_a_bot_that_stopped_answering_are_adopted_by_one_other_bot(database: str) -> None:
    async with stores(database, 3) as (gone, one, two):
        long_ago = utc_now() - timedelta(minutes=5)
        await gone.register_bot("bot-a", "host", 1, None, long_ago)
        await one.register_bot("bot-b", "host", 2, None, utc_now())
        await two.register_bot("bot-c", "host", 3, None, utc_now())
        jobs = [await submit(gone, user) for user in (1, 2, 3)]
        live_since = utc_now() - timedelta(seconds=30)
        taken = await asyncio.gather(
            one.adopt("bot-b", live_since=live_since), two.adopt("bot-c", live_since=live_since)
        )
        again = await one.adopt("bot-b", live_since=live_since)

    adopted = [job.id for found in taken for job in found]
    assert sorted(adopted) == [job.id for job in jobs]  # each by exactly one bot
    assert again == []
    owners = await query(database, "SELECT DISTINCT owner_id FROM jobs")
    assert len(owners) == 1 and owners[0][0] in ("bot-b", "bot-c")


async def test_a_claim_takes_only_jobs_for_the_model_being_served(database: str) -> None:
    async with stores(database, 1) as (store,):
        await register(store, "w")
        await submit(store, 1)
        await store.set_setting("model", "large", utc_now())
        on_small = await claim(store, "w")
        await store.set_setting("model", "small", utc_now())
        on_large_then_small = await claim(store, "w")

    assert on_small == [] and len(on_large_then_small) == 1


@pytest.mark.parametrize("count_attempt", [False, True])
async def test_a_stopping_worker_puts_its_jobs_back_in_line(database: str, count_attempt: bool) -> None:
    async with stores(database, 1) as (store,):
        await register(store, "w")
        job = await submit(store, 1)
        [claimed] = await claim(store, "w")
        await store.requeue([claimed], count_attempt=count_attempt)
        stored = await store.job(job.id)

    assert stored.state is JobState.QUEUED and stored.worker_id is None
    assert stored.attempts == (1 if count_attempt else 0)
