"""What the operator sees of the fleet: ``musicbot status`` and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from datetime import timedelta

import pytest

from bot.jobs import Origin, open_database, utc_now
from bot.jobs.store import JobStore, WorkerRow
from bot.metrics import Metrics
from bot.status import fleet_status
from tests.jobs.fakes import FakeModels, RecordingListener, make_settings, request, running_service


async def test_status_lists_the_workers_the_queue_and_recent_failures(database: str) -> None:
    settings = make_settings(database)
    models = FakeModels()
    models.hold("held")
    listener = RecordingListener()
    async with running_service(settings, models, listener=listener) as service:
        failed = await service.submit(request("fails"), Origin(5))
        await listener.wait_settled([failed.id])
        models.generating.clear()  # set by the failed job's call: wait below for the held job's own
        held = await service.submit(request("held"), Origin(1))
        await models.wait_generating()
        waiting = await service.submit(request("next in line", duration=3), Origin(2))
        async with open_database(database, checkpoint_every=None) as db:
            gone = utc_now() - timedelta(minutes=5)
            await JobStore(db, settings.limits, 10).register_worker(
                WorkerRow("old-gpu", "box2", 7, "cuda:1", gone, gone)
            )
        text = await fleet_status(settings)
        models.release()
        await listener.wait_settled([held.id, waiting.id])

    lines = text.splitlines()
    assert "model served: small" in lines
    assert "workers: 1 alive, 1 not answering" in lines
    worker = next(line for line in lines if line.strip().startswith("worker-"))
    assert f"batch #{held.id}" in worker and "model small" in worker and "heartbeat" in worker
    assert any("old-gpu on box2 (pid 7), cuda:1" in line and "NOT ANSWERING" in line for line in lines)
    assert "queue: 1 running, 1 waiting" in text
    assert f"#{waiting.id} waiting (1): user 2, 3 s, “next in line”" in text
    assert f"#{failed.id}" in text and "the fake engine was told to fail" in text


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_metrics_report_the_queue_the_outcomes_and_the_workers(database: str) -> None:
    settings = make_settings(database)
    listener = RecordingListener()
    async with running_service(settings, FakeModels(), listener=listener) as service:
        jobs = [await service.submit(request(f"song {i}"), Origin(i)) for i in range(3)]
        await listener.wait_settled(job.id for job in jobs)
        async with open_database(database, checkpoint_every=None) as db:
            metrics = Metrics(free_port(), db, settings)
            try:
                await metrics.refresh()
                metrics.observe_generation(1.5)
                port = metrics.port
                text = await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
            finally:
                metrics.close()

    assert "musicbot_queue_length 0.0" in text
    assert 'musicbot_jobs_total{outcome="done"} 3.0' in text
    assert "musicbot_workers 1.0" in text
    assert "musicbot_generation_seconds_count 1.0" in text


def test_metrics_are_off_unless_a_port_is_given() -> None:
    from bot.settings import Settings, SettingsError

    assert Settings.from_env({}).metrics_port is None
    assert Settings.from_env({"MUSICBOT_METRICS_PORT": "9464"}).metrics_port == 9464
    with pytest.raises(SettingsError, match="MUSICBOT_METRICS_PORT"):
        Settings.from_env({"MUSICBOT_METRICS_PORT": "70000"})
