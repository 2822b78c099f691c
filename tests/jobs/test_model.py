"""Model switching, a dying worker, running out of memory: the service keeps serving."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bot.jobs import Job, JobState, Origin
from generation import ModelLoadError
from tests.jobs.fakes import (
    BUG_PROMPT,
    DIE_PROMPT,
    OOM_PROMPT,
    FakeModels,
    RecordingListener,
    make_settings,
    request,
    running_service,
)


async def test_switching_model_lets_the_running_batch_finish_on_the_old_one(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    models.hold("first")
    settings = make_settings(database)
    async with running_service(settings, models, listener=listener) as service:
        first = await service.submit(request("first"), Origin(1))
        await models.wait_generating()
        second = await service.submit(request("second"), Origin(2))
        switching = asyncio.create_task(service.switch_model("medium"))
        await asyncio.sleep(0.05)
        waited = not switching.done()
        models.release()
        info = await switching
        await listener.wait_settled([first.id, second.id])
        jobs = [await service.job(first.id), await service.job(second.id)]

    assert waited
    assert info.name == "fake-medium"
    assert [(call.model, call.prompts) for call in models.calls] == [
        ("fake-small", ["first"]),
        ("fake-medium", ["second"]),
    ]
    assert [job.model for job in jobs] == ["fake-small", "fake-medium"]
    assert models.loads == ["fake-small", "fake-medium"]


async def test_the_chosen_model_wins_over_the_settings_after_a_restart(
    database: str, models: FakeModels
) -> None:
    settings = make_settings(database, model="small")
    async with running_service(settings, models) as service:
        await service.switch_model("large")
    async with running_service(settings, models) as service:
        model, info = service.model, service.model_info

    assert model == "large"
    assert info is not None and info.name == "fake-large"
    assert models.loads == ["fake-small", "fake-large", "fake-large"]


async def test_a_model_that_fails_to_load_keeps_the_old_one(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    models.failing_loads.add("fake-large")
    settings = make_settings(database)
    async with running_service(settings, models, listener=listener) as service:
        with pytest.raises(ModelLoadError) as refused:
            await service.switch_model("large")
        job = await service.submit(request(), Origin(1))
        await listener.wait_settled([job.id])
        stored = await service.job(job.id)
        model = service.model
    async with running_service(settings, models) as service:
        after_restart = service.model

    assert "fake-large is broken" in str(refused.value)
    assert model == after_restart == "small"
    assert stored.model == "fake-small"


async def test_a_stored_model_that_no_longer_loads_falls_back_to_the_settings(
    database: str, models: FakeModels
) -> None:
    settings = make_settings(database)
    async with running_service(settings, models) as service:
        await service.switch_model("large")
    models.failing_loads.add("fake-large")
    async with running_service(settings, models) as service:
        model = service.model

    assert model == "small"


async def test_a_dead_worker_fails_its_batch_and_a_new_one_serves_the_rest(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    async with running_service(make_settings(database, max_batch=1), models, listener=listener) as service:
        doomed = await service.submit(request(DIE_PROMPT), Origin(1))
        later = await service.submit(request("later"), Origin(2))
        await listener.wait_settled([doomed.id, later.id])

    assert listener.outcome(doomed.id) == "failed"
    assert "worker stopped" in listener.reasons[doomed.id]
    assert listener.outcome(later.id) == "finished"
    assert models.loads == ["fake-small", "fake-small"]  # the new worker loaded the model again


async def test_out_of_memory_fails_only_the_job_that_does_not_fit(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    models.hold("first")
    async with running_service(make_settings(database, max_batch=4), models, listener=listener) as service:
        first = await service.submit(request("first"), Origin(9))
        await models.wait_generating()
        jobs = [
            await service.submit(request(prompt), Origin(u))
            for u, prompt in enumerate(["a", OOM_PROMPT, "b"])
        ]
        models.release()
        await listener.wait_settled([first.id, *(j.id for j in jobs)])

    assert [listener.outcome(j.id) for j in jobs] == ["finished", "failed", "finished"]
    assert "out of memory" in listener.reasons[jobs[1].id]


async def test_the_dispatcher_survives_an_unexpected_error(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    async with running_service(make_settings(database, max_batch=1), models, listener=listener) as service:
        buggy = await service.submit(request(BUG_PROMPT), Origin(1))
        fine = await service.submit(request("fine"), Origin(2))
        await listener.wait_settled([buggy.id, fine.id])
        stored = await service.job(buggy.id)

    assert stored.state is JobState.FAILED
    assert stored.error is not None and "went wrong" in stored.error
    assert listener.outcome(fine.id) == "finished"


class FailingListener(RecordingListener):
    async def job_started(self, job: Job) -> None:
        await super().job_started(job)
        raise RuntimeError("the bot could not edit its status message")


async def test_a_failing_listener_does_not_stop_the_job(database: str, models: FakeModels) -> None:
    listener = FailingListener()
    async with running_service(make_settings(database), models, listener=listener) as service:
        job = await service.submit(request(), Origin(1))
        await listener.wait_settled([job.id])

    assert listener.of(job.id)[0] == "started"
    assert listener.outcome(job.id) == "finished"


async def test_listener_calls_for_one_job_come_in_order(database: str) -> None:
    class SlowStart(RecordingListener):
        async def job_started(self, job: Job) -> None:
            await asyncio.sleep(0.05)
            await super().job_started(job)

    listener = SlowStart()
    models = FakeModels(steps=20, step_seconds=0.05)  # a second: progress is written twice a second
    async with running_service(make_settings(database), models, listener=listener) as service:
        job = await service.submit(request(), Origin(1))
        await listener.wait_settled([job.id])

    heard = listener.of(job.id)
    assert heard[0] == "started" and heard[-1] == "finished"
    assert set(heard[1:-1]) == {"progress"}
    assert len(heard) < 22  # progress the listener could not keep up with was folded


async def test_a_model_that_cannot_load_at_start_stops_the_start_and_its_worker(
    database: str, models: FakeModels
) -> None:
    models.failing_loads.add("fake-small")
    with pytest.raises(ModelLoadError):
        async with running_service(make_settings(database), models):
            pass

    assert not [t for t in threading.enumerate() if t.name == "generation-worker"]
