"""Prometheus metrics on an opt-in port (``MUSICBOT_METRICS_PORT``), with ``prometheus_client``.

Every process that serves them reports the fleet as the shared store sees it (queue length, jobs
by state, live workers), read every few seconds off the event loop's path; a worker process adds
the time its own batches took to generate. Scrape any one process for the fleet, every worker for
the generation times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bot.jobs.db import JobsDatabase
from bot.jobs.store import JobStore
from bot.settings import Settings

log = logging.getLogger(__name__)

REFRESH = 5.0
ACTIVE_STATES = ("queued", "running")
OUTCOMES = ("done", "failed", "cancelled")


class _Fleet(Collector):
    """The numbers last read from the store, as metric families."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.workers = 0

    def collect(self) -> Iterator[Any]:
        queue = GaugeMetricFamily("musicbot_queue_length", "Jobs waiting for a worker")
        queue.add_metric([], self.counts.get("queued", 0))
        yield queue
        running = GaugeMetricFamily("musicbot_jobs_running", "Jobs a worker is generating now")
        running.add_metric([], self.counts.get("running", 0))
        yield running
        outcomes = CounterMetricFamily("musicbot_jobs", "Jobs that ended, by outcome", labels=["outcome"])
        for outcome in OUTCOMES:
            outcomes.add_metric([outcome], self.counts.get(outcome, 0))
        yield outcomes
        workers = GaugeMetricFamily("musicbot_workers", "Generation workers alive")
        workers.add_metric([], self.workers)
        yield workers


class Metrics:
    """The HTTP endpoint and the task that keeps its numbers fresh; ``close`` stops both."""

    def __init__(
        self, port: int, db: JobsDatabase, settings: Settings, *, address: str = "127.0.0.1"
    ) -> None:
        self.registry = CollectorRegistry()
        self._fleet = _Fleet()
        self.registry.register(self._fleet)
        self.generation = Histogram(
            "musicbot_generation_seconds",
            "Seconds a batch took to generate on this worker",
            buckets=(1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640),
            registry=self.registry,
        )
        self._store = JobStore(db, settings.limits, settings.queue_size)
        self._lease = settings.lease
        self.port = port
        self._server, self._thread = start_http_server(port, addr=address, registry=self.registry)
        self._refresh = asyncio.create_task(self._refresh_forever(), name="metrics-refresh")
        log.info("Prometheus metrics on http://%s:%d/metrics", address, port)

    def observe_generation(self, seconds: float) -> None:
        self.generation.observe(seconds)

    async def refresh(self) -> None:
        self._fleet.counts = await self._store.counts()
        self._fleet.workers = sum(1 for worker in await self._store.live_workers(self._lease))

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("could not read the metrics from the database: %s", exc)
            await asyncio.sleep(REFRESH)

    def close(self) -> None:
        self._refresh.cancel()
        with contextlib.suppress(Exception):
            self._server.shutdown()
            self._server.server_close()


def serve_metrics(port: int, db: JobsDatabase, settings: Settings) -> Metrics:
    return Metrics(port, db, settings, address=settings.metrics_address)
