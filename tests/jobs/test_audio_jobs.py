"""Jobs with audio input: an extension loads its parent's stored track, a melody is kept in the database."""

from __future__ import annotations

import numpy as np
import pytest

from bot.jobs import JobKind, JobNotFound, MelodyUnavailable, Origin, TrackNotFound, TrackRef
from generation import AudioClip
from tests.databases import query
from tests.jobs.fakes import (
    SAMPLE_RATE,
    FakeModels,
    RecordingListener,
    make_settings,
    request,
    running_service,
)


async def test_an_extension_after_a_restart_continues_the_stored_parent_track(database: str) -> None:
    settings = make_settings(database, max_batch=4)
    first = RecordingListener()
    async with running_service(settings, FakeModels(), listener=first) as service:
        parent = await service.submit(request("theme", duration=3, variations=2), Origin(1))
        await first.wait_settled([parent.id])
    sent = first.tracks[parent.id][1].audio

    models = FakeModels()
    models.hold("blocker")
    listener = RecordingListener()
    async with running_service(settings, models, listener=listener) as service:
        blocker = await service.submit(request("blocker"), Origin(9))
        await models.wait_generating()
        extension = await service.submit(
            request("theme", duration=2), Origin(1), kind=JobKind.EXTEND, parent=TrackRef(parent.id, 1)
        )
        others = [await service.submit(request(f"other {u}", duration=2), Origin(u)) for u in (2, 3)]
        models.release()
        await listener.wait_settled([blocker.id, extension.id, *(j.id for j in others)])
        stored = await service.job(extension.id)

    call = next(call for call in models.calls if call.requests[0].continuation is not None)
    continuation = call.requests[0].continuation
    assert continuation is not None
    assert len(call.requests) == 1  # audio input is never batched
    assert continuation.sample_rate == SAMPLE_RATE
    assert continuation.samples.shape == sent.samples.shape
    np.testing.assert_allclose(continuation.samples, sent.samples, atol=1 / 2**15)
    assert stored.parent == TrackRef(parent.id, 1)
    assert stored.kind is JobKind.EXTEND


async def test_extending_a_track_that_does_not_exist_is_refused(
    database: str, models: FakeModels, listener: RecordingListener
) -> None:
    async with running_service(make_settings(database), models, listener=listener) as service:
        parent = await service.submit(request(), Origin(1))
        await listener.wait_settled([parent.id])
        with pytest.raises(TrackNotFound):
            await service.submit(request(), Origin(1), kind=JobKind.EXTEND, parent=TrackRef(parent.id, 3))
        with pytest.raises(JobNotFound):
            await service.submit(request(), Origin(1), kind=JobKind.EXTEND, parent=TrackRef(999))


async def test_a_melody_is_kept_in_the_database_and_given_to_the_model_after_a_restart(database: str) -> None:
    settings = make_settings(database, model="melody")
    tune = AudioClip(np.linspace(-0.5, 0.5, 2 * 16000, dtype=np.float32)[None, :], 16000)
    held = FakeModels(holding_all=True)
    async with running_service(settings, held) as service:
        job = await service.submit(request("hum", melody=tune), Origin(1))
        plain = await service.submit(request("plain"), Origin(2))
    [(blobs,)] = await query(database, "SELECT count(*) FROM job_audio WHERE job_id = ?", job.id)

    models = FakeModels()
    listener = RecordingListener()
    async with running_service(settings, models, listener=listener) as service:
        await listener.wait_settled([job.id, plain.id])

    assert blobs == 1
    assert job.has_melody and job.request.melody is None
    melody_calls = [call for call in models.calls if call.requests[0].melody is not None]
    assert len(melody_calls) == 1 and len(melody_calls[0].requests) == 1
    melody = melody_calls[0].requests[0].melody
    assert melody is not None
    assert melody.sample_rate == 16000
    np.testing.assert_allclose(melody.samples, tune.samples, atol=1 / 2**15)
    assert listener.outcome(job.id) == "finished"


async def test_a_melody_on_a_model_that_cannot_follow_one_is_refused(
    database: str, models: FakeModels
) -> None:
    tune = AudioClip(np.zeros((1, 8000), dtype=np.float32), 8000)
    async with running_service(make_settings(database), models) as service:
        with pytest.raises(MelodyUnavailable) as refused:
            await service.submit(request("hum", melody=tune), Origin(1))

    assert "/model melody" in str(refused.value)


async def test_a_melody_while_no_worker_serves_is_refused_with_the_model_named(database: str) -> None:
    from bot.jobs import JobService, open_database

    tune = AudioClip(np.zeros((1, 8000), dtype=np.float32), 8000)
    async with open_database(database) as db, JobService(db, make_settings(database)) as service:
        with pytest.raises(MelodyUnavailable) as refused:
            await service.submit(request("hum", melody=tune), Origin(1))

    assert "the small model cannot follow a melody" in str(refused.value)
