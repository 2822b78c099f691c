"""Cancel: a waiting job leaves the queue; a running one stops at the next step; only owners and admins."""

from __future__ import annotations

import time

import pytest

from bot.jobs import JobFinished, JobState, NotAllowed, Origin
from tests.databases import query
from tests.jobs.fakes import FakeModels, RecordingListener, make_settings, request, running_service


async def test_a_cancelled_waiting_job_is_never_generated(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    models.hold()
    async with running_service(make_settings(database), models, listener=listener) as service:
        blocker = await service.submit(request("blocker"), Origin(9))
        waiting = await service.submit(request("never", duration=3), Origin(1))
        cancelled = await service.cancel(waiting.id, user_id=1)
        models.release()
        await listener.wait_settled([blocker.id, waiting.id])
        stored = await service.job(waiting.id)

    assert cancelled.state is JobState.CANCELLED
    assert stored.state is JobState.CANCELLED
    assert stored.finished_at is not None
    assert listener.outcome(waiting.id) == "cancelled"
    assert all("never" not in call.prompts for call in models.calls)


async def test_a_running_job_stops_at_the_next_step(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    models.steps, models.step_seconds = 400, 0.005
    async with running_service(make_settings(database), models, listener=listener) as service:
        job = await service.submit(request("long"), Origin(1))
        await listener.heard("progress", job.id)
        began = time.monotonic()
        await service.cancel(job.id, user_id=1)
        await listener.wait_settled([job.id])
        stopped_in = time.monotonic() - began
        models.steps = 4
        after = await service.submit(request("after"), Origin(1))
        await listener.wait_settled([after.id])
        stored = await service.job(job.id)
        tracks = await service.tracks(job.id)

    assert models.cancels_seen[0] is True
    assert stopped_in < 1.0  # the whole job takes 2 s
    assert stored.state is JobState.CANCELLED
    assert tracks == []
    assert listener.outcome(after.id) == "finished"


async def test_cancelling_one_job_of_a_batch_lets_the_others_finish(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    models.hold("blocker", "keep")
    async with running_service(make_settings(database, max_batch=4), models, listener=listener) as service:
        blocker = await service.submit(request("blocker"), Origin(9))
        await models.wait_generating()
        keep = await service.submit(request("keep"), Origin(1))
        drop = await service.submit(request("drop"), Origin(2))
        models.release("blocker")
        await listener.heard("started", drop.id)
        await service.cancel(drop.id, user_id=2)
        models.release()
        await listener.wait_settled([blocker.id, keep.id, drop.id])

    assert [call.prompts for call in models.calls][1] == ["keep", "drop"]
    assert listener.outcome(keep.id) == "finished"
    assert listener.outcome(drop.id) == "cancelled"
    assert await query(database, "SELECT count(*) FROM tracks WHERE job_id = ?", drop.id) == [(0,)]


async def test_only_the_owner_or_an_admin_may_cancel(database: str, models: FakeModels) -> None:
    models.hold()
    async with running_service(make_settings(database), models) as service:
        blocker = await service.submit(request(), Origin(9))
        job = await service.submit(request(), Origin(1))
        with pytest.raises(NotAllowed):
            await service.cancel(job.id, user_id=2)
        still = await service.job(job.id)
        by_admin = await service.cancel(job.id, user_id=2, is_admin=True)
        await service.cancel(blocker.id, user_id=9)
        models.release()

    assert still.state is JobState.QUEUED
    assert by_admin.state is JobState.CANCELLED


async def test_a_finished_job_cannot_be_cancelled(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    async with running_service(make_settings(database), models, listener=listener) as service:
        job = await service.submit(request(), Origin(1))
        await listener.wait_settled([job.id])
        with pytest.raises(JobFinished) as refused:
            await service.cancel(job.id, user_id=1)

    assert "already done" in str(refused.value)


async def test_cancel_waiting_cancels_a_users_waiting_jobs_but_not_the_running_one(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    models.hold()
    async with running_service(make_settings(database), models, listener=listener) as service:
        running = await service.submit(request("running"), Origin(1))
        await models.wait_generating()
        waiting = [await service.submit(request(f"w{i}"), Origin(1)) for i in range(3)]
        cancelled = await service.cancel_waiting(1)
        models.release()
        await listener.wait_settled([running.id, *(j.id for j in waiting)])

    assert sorted(j.id for j in cancelled) == sorted(j.id for j in waiting)
    assert listener.outcome(running.id) == "finished"
