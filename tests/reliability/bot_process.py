"""``musicbot run`` against the Discord emulator in a child process, with a fake generator and places to
stall, for the tests that kill, signal or read the logs of a real bot process.

    python -m tests.reliability.bot_process API_URL GATEWAY_URL [options]

It runs the real entry point (``bot.cli.main(["run"])``: settings from the environment, database,
job service, the supervised worker process, discord.py client, signal handling), with only the model
swapped for fake engines (in the worker process too). Options:

    --hold PROMPT          generating that prompt waits until the process ends (or is told to stop)
    --stall POINT:PROMPT   stop dead at POINT for jobs of that prompt and print ``stalled POINT ID``:
                           submit     acknowledged, not yet queued (ID: the user)
                           deliver    generated and stored, not yet sent to Discord (ID: the job)
                           delivered  sent to Discord, not yet recorded as delivered (ID: the job)
    --lifetime SECONDS     the interaction lifetime the bot assumes (Discord's: 900)
    --fail PROMPT          generating that prompt fails with an error message
    --step-seconds S       each of the fake engine's 4 steps takes S seconds
    -v                     log everything, discord.py included (the token test)

It prints ``generating PROMPTS`` when a batch starts. Only the tests use this module.

    python -m tests.reliability.bot_process worker --id ID [--hold P] [--fail P] [--steps N]
                                                   [--step-seconds S] [--supervised]

runs ``musicbot worker`` with the same fake engines (``musicbot run`` above starts it so).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import discord
import yarl

import bot.runner
import bot.supervisor
from bot.cli import main
from bot.client import make_bot
from bot.delivery import DiscordDelivery
from bot.jobs import Job, JobService, JobTrack
from generation import GenerationError, GenerationRequest, GenerationResult, GenerationWorker
from tests.jobs.fakes import FakeEngine, FakeModels


def say(line: str) -> None:
    print(line, flush=True)


class PrintingModels(FakeModels):
    def __call__(self, source: str) -> FakeEngine:
        self.loads.append(source)
        return PrintingEngine(self, source)


class PrintingEngine(FakeEngine):
    failing: frozenset[str] = frozenset()

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[GenerationResult]:
        say("generating " + "|".join(request.prompt for request in requests))
        if any(request.prompt in self.failing for request in requests):
            raise GenerationError("the fake engine was told to fail")
        return super().generate(requests, progress, cancel)


def fake_models(
    hold: Sequence[str], fail: Sequence[str], *, steps: int = 4, step_seconds: float = 0.0
) -> None:
    """``musicbot worker`` in this process gets fake engines that hold or fail these prompts, and take
    ``steps`` steps of ``step_seconds`` each."""
    models = PrintingModels(steps=steps, step_seconds=step_seconds)
    if hold:
        models.hold(*hold)  # (with no prompt it would hold every generation)
    PrintingEngine.failing = frozenset(fail)
    bot.runner.make_worker_factory = lambda settings, quiet=False: lambda: GenerationWorker(models)  # type: ignore[assignment]


def fake_worker_command(engine: Sequence[str], verbose: bool = False) -> Callable[[str], list[str]]:
    def command(worker_id: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tests.reliability.bot_process",
            "worker",
            *engine,
            "--supervised",
            "--id",
            worker_id,
        ]

    return command


def worker_main(argv: Sequence[str]) -> int:
    """``musicbot worker`` with the fake engines (``--supervised``: as ``musicbot run`` starts it)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--hold", action="append", default=[])
    parser.add_argument("--fail", action="append", default=[])
    parser.add_argument("--id", required=True)
    parser.add_argument("--supervised", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    args = parser.parse_args(argv)
    fake_models(args.hold, args.fail, steps=args.steps, step_seconds=args.step_seconds)
    return main(["worker", *(["--supervised"] if args.supervised else []), "--id", args.id])


async def forever(point: str, what: int) -> None:
    say(f"stalled {point} {what}")
    await asyncio.Event().wait()


def install_stalls(stalls: dict[str, set[str]]) -> None:
    submit, finished, delivered = JobService.submit, DiscordDelivery.job_finished, JobService.mark_delivered

    async def stalling_submit(self: JobService, request: GenerationRequest, *args: Any, **kw: Any) -> Job:
        if request.prompt in stalls["submit"]:
            await forever("submit", args[0].user_id)
        return await submit(self, request, *args, **kw)

    async def stalling_finished(self: DiscordDelivery, job: Job, tracks: Sequence[JobTrack]) -> None:
        if job.request.prompt in stalls["deliver"]:
            await forever("deliver", job.id)
        await finished(self, job, tracks)

    async def stalling_delivered(self: JobService, job_id: int, **kw: Any) -> Job:
        if (await self.job(job_id)).request.prompt in stalls["delivered"]:
            await forever("delivered", job_id)
        return await delivered(self, job_id, **kw)

    JobService.submit = stalling_submit  # type: ignore[method-assign]
    DiscordDelivery.job_finished = stalling_finished  # type: ignore[method-assign]
    JobService.mark_delivered = stalling_delivered  # type: ignore[method-assign]


def configure(argv: Sequence[str]) -> list[str]:
    parser = argparse.ArgumentParser()
    parser.add_argument("api_url")
    parser.add_argument("gateway_url")
    parser.add_argument("--hold", action="append", default=[])
    parser.add_argument("--stall", action="append", default=[])
    parser.add_argument("--fail", action="append", default=[])
    parser.add_argument("--lifetime", type=float, default=900.0)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.api_url.startswith("http://127.0.0.1:") or not args.gateway_url.startswith("ws://127.0.0.1:"):
        raise SystemExit("bot_process only talks to an emulator on 127.0.0.1")
    discord.http.Route.BASE = args.api_url
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(args.gateway_url)

    fake_models(args.hold, args.fail)
    engine = [
        *(f"--hold={prompt}" for prompt in args.hold),
        *(f"--fail={prompt}" for prompt in args.fail),
        f"--step-seconds={args.step_seconds}",
    ]
    # The real supervisor starts real worker processes, with the same fake engines.
    bot.supervisor.worker_command = functools.partial(fake_worker_command, engine)  # type: ignore[assignment]
    bot.runner.make_bot = functools.partial(  # type: ignore[assignment]
        make_bot, interaction_lifetime=timedelta(seconds=args.lifetime), guild_ready_timeout=0.05
    )
    stalls: dict[str, set[str]] = {"submit": set(), "deliver": set(), "delivered": set()}
    for stall in args.stall:
        point, _, prompt = stall.partition(":")
        stalls[point].add(prompt)
    install_stalls(stalls)
    return ["-v", "run"] if args.verbose else ["run"]


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(main(configure(sys.argv[1:])))
