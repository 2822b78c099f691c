"""Limits are checked and recorded atomically, derived from the job rows, and say when they free."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from bot.jobs import InvalidLimit, JobKind, LimitExceeded, Origin, QueueFull, open_database, utc_now
from bot.jobs.store import JobStore, NewJob
from bot.settings import Limits
from tests.databases import query
from tests.jobs.fakes import (
    FAIL_PROMPT,
    FakeClock,
    FakeModels,
    RecordingListener,
    make_settings,
    request,
    running_service,
)


async def test_200_concurrent_submissions_accept_exactly_the_limit(database: str, models: FakeModels) -> None:
    models.hold()
    settings = make_settings(database, max_queued=2, queue_size=1000)
    async with running_service(settings, models) as service:

        async def attempt(user: int, n: int) -> int | LimitExceeded:
            try:
                job = await service.submit(request(f"user {user} try {n}"), Origin(user, 1, 1))
            except LimitExceeded as exc:
                return exc
            return job.id

        outcomes = await asyncio.gather(*(attempt(user, n) for n in range(10) for user in range(20)))
        accepted = [o for o in outcomes if isinstance(o, int)]
        refused = [o for o in outcomes if isinstance(o, LimitExceeded)]

        assert len(accepted) == 40
        assert len(set(accepted)) == 40
        assert len(refused) == 160
        assert {exc.limit for exc in refused} == {"max_queued"}
        assert all("max_queued" in str(exc) for exc in refused)
        rows = await query(database, "SELECT user_id, count(*) FROM jobs GROUP BY user_id")
        [total] = await query(database, "SELECT count(*), count(DISTINCT id) FROM jobs")
        assert dict(rows) == {user: 2 for user in range(20)}
        assert total == (40, 40)
        models.release()


async def test_two_connections_cannot_both_pass_a_limit(database: str) -> None:
    async with open_database(database) as one, open_database(database) as two:
        stores = [JobStore(db, Limits(max_queued=2), queue_size=100) for db in (one, two)]

        async def attempt(store: JobStore) -> bool:
            new = NewJob(Origin(1), JobKind.NEW, request().with_seed())
            try:
                await store.add_job(new, exempt=False, now=utc_now())
            except LimitExceeded:
                return False
            return True

        outcomes = await asyncio.gather(*(attempt(stores[i % 2]) for i in range(40)))

    assert outcomes.count(True) == 2
    assert await query(database, "SELECT count(*) FROM jobs") == [(2,)]


async def test_daily_seconds_refusal_names_the_limit_and_when_it_frees(
    database: str, models: FakeModels, clock: FakeClock
) -> None:
    settings = make_settings(database, daily_seconds=30)
    async with running_service(settings, models, clock=clock) as service:
        first = await service.submit(request(duration=20), Origin(7))
        clock.advance(hours=1)
        with pytest.raises(LimitExceeded) as refused:
            await service.submit(request(duration=6, variations=2), Origin(7))

    assert refused.value.limit == "daily_seconds"
    assert refused.value.value == 30
    assert refused.value.frees_at == first.created_at + timedelta(hours=24)
    assert "daily_seconds" in str(refused.value)
    assert "2026-01-02 12:00 UTC" in str(refused.value)


async def test_daily_seconds_free_up_when_jobs_leave_the_24_hour_window(
    database: str, models: FakeModels, clock: FakeClock, listener: RecordingListener
) -> None:
    settings = make_settings(database, daily_seconds=30)
    async with running_service(settings, models, clock=clock, listener=listener) as service:
        job = await service.submit(request(duration=20), Origin(7))
        await listener.wait_settled([job.id])
        clock.advance(hours=24)
        again = await service.submit(request(duration=20), Origin(7))
        usage = await service.usage(7)

    assert again.id > job.id
    assert usage.seconds_used == 20
    assert usage.seconds_left == 10


async def test_a_failed_job_gives_its_seconds_back(
    database: str, models: FakeModels, clock: FakeClock, listener: RecordingListener
) -> None:
    settings = make_settings(database, daily_seconds=30)
    async with running_service(settings, models, clock=clock, listener=listener) as service:
        failing = await service.submit(request(FAIL_PROMPT, duration=20), Origin(7))
        await listener.wait_settled([failing.id])
        accepted = await service.submit(request(duration=20), Origin(7))

    assert listener.outcome(failing.id) == "failed"
    assert accepted.seconds == 20


async def test_a_cancelled_job_gives_its_seconds_back(
    database: str, models: FakeModels, clock: FakeClock
) -> None:
    models.hold()
    settings = make_settings(database, daily_seconds=30)
    async with running_service(settings, models, clock=clock) as service:
        blocker = await service.submit(request(duration=5), Origin(1))
        waiting = await service.submit(request(duration=20), Origin(7))
        with pytest.raises(LimitExceeded):
            await service.submit(request(duration=20), Origin(7))
        await service.cancel(waiting.id, user_id=7)
        accepted = await service.submit(request(duration=20), Origin(7))
        models.release()

    assert accepted.id > waiting.id > blocker.id


async def test_a_request_longer_than_max_duration_is_refused(database: str, models: FakeModels) -> None:
    async with running_service(make_settings(database, max_duration=30), models) as service:
        with pytest.raises(LimitExceeded) as refused:
            await service.submit(request(duration=31), Origin(7))
        [(count,)] = await query(database, "SELECT count(*) FROM jobs")

    assert refused.value.limit == "max_duration"
    assert refused.value.value == 30
    assert "30 s" in str(refused.value)
    assert count == 0


async def test_a_full_queue_refuses_with_queue_full(database: str, models: FakeModels) -> None:
    models.hold()
    async with running_service(make_settings(database, queue_size=3), models) as service:
        for user in range(3):
            await service.submit(request(), Origin(user))
        with pytest.raises(QueueFull) as refused:
            await service.submit(request(), Origin(99))
        with pytest.raises(QueueFull):
            await service.submit(request(), Origin(100), is_admin=True)
        models.release()

    assert refused.value.limit == "queue_size"
    assert "queue is full" in str(refused.value)


async def test_admins_are_exempt_from_per_user_limits(database: str, models: FakeModels) -> None:
    models.hold()
    settings = make_settings(database, max_queued=1, daily_seconds=10, max_duration=30)
    async with running_service(settings, models) as service:
        await service.set_limits(7, max_duration=5)
        jobs = [await service.submit(request(duration=30), Origin(7), is_admin=True) for _ in range(3)]
        usage = await service.usage(7, is_admin=True)
        with pytest.raises(LimitExceeded) as refused:
            await service.submit(request(duration=31), Origin(7), is_admin=True)
        models.release()

    assert len({job.id for job in jobs}) == 3
    assert usage.seconds_left == float("inf")
    # An admin's longest track is the server-wide one, not a lower override of their own.
    assert refused.value.limit == "max_duration"


async def test_a_user_override_wins_and_survives_a_restart(database: str, models: FakeModels) -> None:
    models.hold()
    settings = make_settings(database, max_queued=1)
    async with running_service(settings, models) as service:
        limits = await service.set_limits(7, max_queued=3)
        assert limits.max_queued == 3
        assert (await service.limits(8)).max_queued == 1

    async with running_service(settings, models) as service:
        for _ in range(3):
            await service.submit(request(), Origin(7))
        with pytest.raises(LimitExceeded):
            await service.submit(request(), Origin(7))
        overrides = await service.limit_overrides()
        models.release()

    assert overrides[7].max_queued == 3


async def test_a_default_override_wins_over_the_environment_after_a_restart(
    database: str, models: FakeModels
) -> None:
    settings = make_settings(database, daily_seconds=600)
    async with running_service(settings, models) as service:
        await service.set_limits(None, daily_seconds=100)
        await service.set_limits(7, max_queued=4)

    async with running_service(settings, models) as service:
        default = await service.limits()
        user = await service.limits(7)
        reset = await service.reset_limits(None)

    assert default.daily_seconds == 100
    assert (user.daily_seconds, user.max_queued) == (100, 4)
    assert reset.daily_seconds == 600


async def test_limits_out_of_range_are_refused_and_change_nothing(database: str, models: FakeModels) -> None:
    async with running_service(make_settings(database), models) as service:
        with pytest.raises(InvalidLimit) as refused:
            await service.set_limits(7, max_duration=0)
        overrides = await service.limit_overrides()

    assert refused.value.field == "max_duration"
    assert overrides == {}


async def test_max_queued_refusal_estimates_when_it_frees(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    async with running_service(make_settings(database, max_queued=1), models, listener=listener) as service:
        warm = await service.submit(request("warm up"), Origin(1))
        await listener.wait_settled([warm.id])  # one finished job gives a measured speed
        models.hold()
        await service.submit(request(), Origin(7))
        with pytest.raises(LimitExceeded) as refused:
            await service.submit(request(), Origin(7))
        models.release()

    assert refused.value.limit == "max_queued"
    assert refused.value.frees_at is not None
