"""Waiting jobs are served fairly, compatible ones together, and the queue says where each stands."""

from __future__ import annotations

import pytest

from bot.jobs import Origin
from generation import SamplingParams
from tests.jobs.fakes import FakeModels, RecordingListener, make_settings, request, running_service


async def test_users_take_turns_so_b_and_c_come_second_and_third(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    models.hold()
    async with running_service(make_settings(database, max_batch=1), models, listener=listener) as service:
        a_jobs = [await service.submit(request(f"A{i}"), Origin(1)) for i in range(6)]
        b = await service.submit(request("B0"), Origin(2))
        c = await service.submit(request("C0"), Origin(3))
        models.release()
        await listener.wait_settled([*(j.id for j in a_jobs), b.id, c.id])

    served = [call.prompts for call in models.calls]
    assert served == [["A0"], ["B0"], ["C0"], ["A1"], ["A2"], ["A3"], ["A4"], ["A5"]]


async def test_a_users_jobs_are_served_oldest_first(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    models.hold()
    async with running_service(make_settings(database, max_batch=4), models, listener=listener) as service:
        jobs = [await service.submit(request("held", duration=1), Origin(9))]
        # A's second job fits B's batch, but A's first does not: A's order wins over batching.
        jobs.append(await service.submit(request("B long", duration=3), Origin(2)))
        jobs.append(await service.submit(request("A short", duration=2), Origin(1)))
        jobs.append(await service.submit(request("A long", duration=3), Origin(1)))
        models.release()
        await listener.wait_settled(j.id for j in jobs)

    served = [call.prompts for call in models.calls]
    assert served == [["held"], ["B long"], ["A short"], ["A long"]]


async def test_compatible_jobs_are_merged_into_one_generate_call(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    models.hold()
    async with running_service(make_settings(database, max_batch=4), models, listener=listener) as service:
        first = await service.submit(request("first"), Origin(9))
        await models.wait_generating()
        same = [await service.submit(request(f"same {u}", duration=4), Origin(u)) for u in range(3)]
        models.release()
        await listener.wait_settled([first.id, *(j.id for j in same)])
        done = [await service.job(j.id) for j in same]

    assert [call.prompts for call in models.calls] == [["first"], ["same 0", "same 1", "same 2"]]
    # Each job keeps its own result.
    assert [listener.tracks[j.id][0].seed for j in same] == [j.request.seed for j in same]
    assert all(job.result is not None and job.result.seconds == 4 for job in done)


async def test_jobs_of_different_length_or_sampling_are_not_merged(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    models.hold()
    async with running_service(make_settings(database, max_batch=4), models, listener=listener) as service:
        first = await service.submit(request("first"), Origin(9))
        await models.wait_generating()
        jobs = [
            await service.submit(request("four", duration=4), Origin(1)),
            await service.submit(request("five", duration=5), Origin(2)),
            await service.submit(
                request("hot", duration=4, sampling=SamplingParams(temperature=1.5)), Origin(3)
            ),
            await service.submit(request("loop", duration=4, loop=True), Origin(4)),
            await service.submit(request("four too", duration=4), Origin(5)),
        ]
        models.release()
        await listener.wait_settled([first.id, *(j.id for j in jobs)])

    assert [call.prompts for call in models.calls] == [
        ["first"],
        ["four", "four too"],
        ["five"],
        ["hot"],
        ["loop"],
    ]


async def test_variations_count_toward_the_batch_size(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    models.hold()
    async with running_service(make_settings(database, max_batch=4), models, listener=listener) as service:
        first = await service.submit(request("first"), Origin(9))
        await models.wait_generating()
        jobs = [await service.submit(request(f"v{u}", variations=2), Origin(u)) for u in range(3)]
        models.release()
        await listener.wait_settled([first.id, *(j.id for j in jobs)])

    assert [call.prompts for call in models.calls] == [["first"], ["v0", "v1"], ["v2"]]
    assert [len(listener.tracks[j.id]) for j in jobs] == [2, 2, 2]


async def test_queue_shows_positions_in_serving_order_with_estimates(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    async with running_service(make_settings(database, max_batch=1), models, listener=listener) as service:
        warm = await service.submit(request("warm up"), Origin(9))
        await listener.wait_settled([warm.id])
        models.hold()
        models.generating.clear()  # the warm-up's call set it: wait for this job's own
        running = await service.submit(request("running"), Origin(1))
        await models.wait_generating()
        a2 = await service.submit(request("A again"), Origin(1))
        b = await service.submit(request("B"), Origin(2))
        entries = service.queue()
        mine = service.queue(user_id=1)
        where = service.position(a2.id)
        models.release()

    assert [(e.job.id, e.position) for e in entries] == [(running.id, 0), (b.id, 1), (a2.id, 2)]
    assert [e.job.id for e in mine] == [running.id, a2.id]
    # position() asks a moment after queue(): the same place, estimates a moment further on
    assert where is not None and (where.job.id, where.position) == (a2.id, 2)
    assert where.starts_in == pytest.approx(entries[2].starts_in, abs=0.5)
    assert service.speed is not None
    assert all(e.starts_in is not None and e.done_in is not None for e in entries)
    assert entries[1].starts_in <= entries[2].starts_in  # type: ignore[operator]
