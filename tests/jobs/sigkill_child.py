"""Run by the SIGKILL test: a service that accepts jobs, starts a slow batch and waits to be killed.

Prints ``accepted ID`` once a submission returned and ``started ID`` when a job begins, flushed.
"""

from __future__ import annotations

import asyncio
import sys

from bot.jobs import BaseJobListener, Job, Origin
from tests.jobs.fakes import FakeModels, make_settings, request, running_service

JOBS = 6


class PrintingListener(BaseJobListener):
    async def job_started(self, job: Job) -> None:
        print(f"started {job.id}", flush=True)


async def main(db_path: str) -> None:
    models = FakeModels(steps=100_000, step_seconds=0.01)
    settings = make_settings(db_path, max_batch=2)
    async with running_service(settings, models, listener=PrintingListener()) as service:
        for i in range(JOBS):
            job = await service.submit(request(f"job {i}", duration=2 + i % 2), Origin(i % 3))
            print(f"accepted {job.id}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
