"""After a stop, a crash or a kill, every accepted job is finished or failed with a reason; none is lost."""

from __future__ import annotations

import asyncio
import signal
import sys
from datetime import timedelta
from pathlib import Path

from bot.jobs import Delivery, JobState, Origin
from tests.databases import query, states
from tests.jobs.fakes import FakeClock, FakeModels, RecordingListener, make_settings, request, running_service
from tests.jobs.sigkill_child import JOBS

REPO = Path(__file__).resolve().parents[2]


async def test_closing_mid_queue_then_starting_again_finishes_every_job(database: str) -> None:
    slow = FakeModels(steps=400, step_seconds=0.005)
    first = RecordingListener()
    settings = make_settings(database, max_batch=1)
    async with running_service(settings, slow, listener=first) as service:
        accepted = [await service.submit(request(f"job {i}"), Origin(i % 3)) for i in range(6)]
        await first.until(lambda: any(kind == "progress" for kind, _ in first.events))

    assert set((await states(database)).values()) == {"queued"}  # the interrupted one waits again

    again = RecordingListener()
    async with running_service(settings, FakeModels(), listener=again) as service:
        await again.wait_settled(job.id for job in accepted)
        jobs = [await service.job(job.id) for job in accepted]

    assert [job.state for job in jobs] == [JobState.DONE] * 6
    assert {("requeued", job.id) for job in accepted} <= set(again.events)
    # A clean shutdown does not count against the job's attempts.
    assert max(job.attempts for job in jobs) == 1


async def test_a_killed_process_loses_no_accepted_job(database: str) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.jobs.sigkill_child",
        database,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    accepted: list[int] = []
    started: list[int] = []
    try:
        while len(accepted) < JOBS or not started:
            line = await asyncio.wait_for(child.stdout.readline(), timeout=30)
            assert line, "the child process ended early"
            word, job_id = line.decode().split()
            (accepted if word == "accepted" else started).append(int(job_id))
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    assert "running" in (await states(database)).values()

    listener = RecordingListener()
    async with running_service(make_settings(database), FakeModels(), listener=listener) as service:
        await listener.wait_settled(accepted)
        jobs = {job_id: await service.job(job_id) for job_id in accepted}

    assert set(await states(database)) == set(accepted)
    assert {job.state for job in jobs.values()} == {JobState.DONE}
    assert all(jobs[job_id].attempts == 2 for job_id in started)


async def test_a_job_interrupted_too_often_fails_with_a_reason(
    database: str, listener: RecordingListener
) -> None:
    settings = make_settings(database)
    async with running_service(settings, FakeModels(holding_all=True)) as service:
        job = await service.submit(request(), Origin(1))
    # As the database is left after the process died twice while generating it.
    await query(database, "UPDATE jobs SET state = 'running', attempts = 2 WHERE id = ? RETURNING id", job.id)

    async with running_service(settings, FakeModels(), listener=listener, max_attempts=2) as service:
        await listener.wait_settled([job.id])
        stored = await service.job(job.id)

    assert stored.state is JobState.FAILED
    assert stored.error is not None and "2 times" in stored.error
    assert listener.reasons[job.id] == stored.error


async def test_an_undelivered_result_is_handed_over_again_until_marked_delivered(
    database: str, clock: FakeClock
) -> None:
    settings = make_settings(database)
    first = RecordingListener()
    delivery = Delivery(application_id=5, interaction_token="secret", interaction_created_at=clock.now)
    async with running_service(settings, FakeModels(), listener=first, clock=clock) as service:
        job = await service.submit(request(duration=3, variations=2), Origin(1, 2, 3), delivery=delivery)
        await first.wait_settled([job.id])
        original = first.tracks[job.id]

    again = RecordingListener()
    async with running_service(settings, FakeModels(), listener=again, clock=clock) as service:
        await again.wait_settled([job.id])
        handed = again.tracks[job.id]
        delivered = await service.mark_delivered(job.id, result_message_id=77)

    third = RecordingListener()
    async with running_service(settings, FakeModels(), listener=third, clock=clock) as service:
        await asyncio.sleep(0.05)

    assert [t.seed for t in handed] == [t.seed for t in original] == list(job.request.row_seeds)
    assert [t.audio.samples.shape for t in handed] == [(1, 3 * 8000)] * 2
    assert delivered.delivered_at == clock.now
    assert delivered.delivery.result_message_id == 77
    assert delivered.delivery.interaction_token is None  # no token kept once delivered
    assert third.events == []


async def test_delivery_details_are_kept_with_the_job(
    database: str, models: FakeModels, clock: FakeClock
) -> None:
    delivery = Delivery(application_id=5, interaction_token="secret", interaction_created_at=clock.now)
    async with running_service(make_settings(database), models, clock=clock) as service:
        job = await service.submit(request(), Origin(1, 2, 3), delivery=delivery)
        await service.update_delivery(job.id, status_message_id=10, thread_id=20)
        stored = await service.job(job.id)
        in_thread = await service.job_for_thread(20)

    assert stored.origin == Origin(1, 2, 3)
    assert stored.delivery == Delivery(5, "secret", clock.now, status_message_id=10, thread_id=20)
    assert stored.delivery.interaction_usable(clock.now + timedelta(minutes=14))
    assert not stored.delivery.interaction_usable(clock.now + timedelta(minutes=15))
    assert in_thread is not None and in_thread.id == job.id
    assert stored.request.seed is not None  # chosen at submit and stored
