"""``musicbot run``: settings, database, job service and generation worker, then the Discord client.

The token is checked first (logging in is quick; loading a model is not), so a missing or rejected
token stops the start at once with a message that says what to do, never with the token in it. A
damaged or locked database, a second bot already running on the same database, or a model that
does not load, stops it with one line too.

SIGTERM or Ctrl-C stops it in order: no new jobs are taken (users are told to try again in a
minute), the running batch is put back in the queue, status messages are brought up to date, the
gateway is closed and the database checkpointed and closed. A second signal stops it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sqlite3
from collections.abc import Iterator

import aiohttp
import discord

from bot.client import MusicBot, make_bot
from bot.jobs import DatabaseError, JobService, ServiceOptions, WorkerFactory, open_database, sole_bot
from bot.metrics import serve_metrics
from bot.settings import MODEL_SIZES, Settings, model_variable
from bot.supervisor import Command, LocalWorkers, WorkerStartFailed, end_orphans
from generation import Engine, GenerationWorker, MelodyRouter, ModelLoadError
from generation.catalog import melody_size_for

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StartupError(Exception):
    """``musicbot run`` cannot start; the message says why and what to do."""


async def run(
    settings: Settings,
    *,
    worker_factory: WorkerFactory | None = None,
    worker_command: Command | None = None,
) -> None:
    """Run the bot until it is stopped (by SIGTERM or Ctrl-C, or by the connection failing).

    The generation workers run as processes: ``MUSICBOT_WORKERS`` of them (default one) started and
    supervised here (``worker_command`` says how to start one); with 0, workers elsewhere serve the
    database. ``worker_factory`` instead runs a worker side inside this process (tests).
    """
    token = settings.discord_token
    if not token:
        raise StartupError(
            "DISCORD_TOKEN is not set: copy the bot token from your application's Bot page in the"
            " Discord developer portal into .env or the environment (see README)"
        )
    # The bot plays no voice: discord.py's warnings about voice libraries would only confuse.
    discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
    stop = asyncio.Event()
    with _stopped_by_signals(stop):
        try:
            with _one_bot_per_file(settings):
                async with open_database(settings.database) as db:
                    service = JobService(
                        db,
                        settings,
                        worker_factory,
                        options=ServiceOptions(
                            poll=0.25 if not settings.shared_database else 2.0, bot_lease=settings.lease
                        ),
                        shards=_shards_text(settings),
                    )
                    bot = make_bot(service, settings)
                    if not settings.shared_database:
                        await end_orphans(db, settings)
                    async with bot:
                        await _login(bot, token)
                        await _start(service, settings)
                        workers = None
                        if worker_factory is None and settings.workers > 0:
                            workers = LocalWorkers(db, settings, settings.workers, command=worker_command)
                        metrics = (
                            serve_metrics(settings.metrics_port, db, settings)
                            if settings.metrics_port
                            else None
                        )
                        try:
                            if workers is not None:
                                await _start_workers(workers)
                            await _serve(bot, service, stop, workers)
                        finally:
                            if workers is not None:
                                await workers.close()
                            await service.close()
                            if metrics is not None:
                                metrics.close()
        except DatabaseError as exc:
            raise StartupError(str(exc)) from None
        except asyncio.CancelledError:
            # Stopped at once (a second signal): what the client started (discord.py's ready task,
            # say) must end before the loop closes, or it is destroyed pending.
            await _cancel_the_rest()
            raise
    log.info("stopped")


async def _cancel_the_rest(rounds: int = 3) -> None:
    for _ in range(rounds):
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        if not others:
            return
        for task in others:
            task.cancel()
        await asyncio.wait(others, timeout=1.0)


@contextlib.contextmanager
def _one_bot_per_file(settings: Settings) -> Iterator[None]:
    """A SQLite file serves one bot process; PostgreSQL serves any number (shards)."""
    if settings.shared_database:
        yield
        return
    with sole_bot(settings.db_path):
        yield


def _shards_text(settings: Settings) -> str | None:
    if settings.shard_count is None:
        return None
    ids = settings.shard_ids if settings.shard_ids is not None else range(settings.shard_count)
    return f"{','.join(str(i) for i in ids)} of {settings.shard_count}"


async def _start(service: JobService, settings: Settings) -> None:
    try:
        await service.start()
        freeze_startup_objects()
    except ModelLoadError as exc:
        raise StartupError(f"the model could not be loaded: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise StartupError(
            f"the database {settings.db_path} is damaged ({exc}): restore a copy made with"
            " `musicbot backup`, or move the file away to start with an empty one"
        ) from None


async def _start_workers(workers: LocalWorkers) -> None:
    try:
        await workers.start()
    except WorkerStartFailed as exc:
        raise StartupError(f"the generation worker could not start: {exc}") from None


def freeze_startup_objects() -> None:
    """Keep what the start made (modules, torch, transformers, the model) out of full GC passes.

    With torch and transformers loaded, a full collection walks hundreds of thousands of long-lived
    objects and stalls the event loop (docs/reliability.md has the figures); frozen, they are skipped.
    Freezing keeps nothing alive that reference counting frees: a switched-out model has no reference
    cycles, so its memory is still given back.
    """
    gc.collect()
    gc.freeze()


async def _serve(
    bot: MusicBot, service: JobService, stop: asyncio.Event, workers: LocalWorkers | None
) -> None:
    """Keep the gateway connection until ``stop`` is set (or the connection ends by itself)."""
    connection = asyncio.create_task(bot.connect(), name="discord-connection")
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait([connection, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if connection.done():
        connection.result()  # its error, if it ended with one
        return
    log.info("stopping: no new jobs are taken; waiting and running jobs are kept for the next start")
    try:
        # Still connected meanwhile: new commands are answered "restarting, try again in a minute".
        if workers is not None:
            await workers.close()
        await service.close()
    finally:
        await bot.close()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await connection


@contextlib.contextmanager
def _stopped_by_signals(stop: asyncio.Event) -> Iterator[None]:
    """The first SIGTERM or SIGINT sets ``stop``; a second one cancels the run at once."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    installed = []

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s again: stopping at once", sig.name)
            if main is not None:
                main.cancel()
            return
        log.warning("%s: stopping (send it again to stop at once)", sig.name)
        stop.set()

    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _login(bot: MusicBot, token: str) -> None:
    try:
        await bot.login(token)
    except discord.LoginFailure:
        raise StartupError(
            "Discord rejected DISCORD_TOKEN (401 Unauthorized): reset the token on your application's Bot"
            " page in the Discord developer portal and put the new one in .env"
        ) from None
    except discord.Forbidden as exc:  # the command sync in setup_hook: not in that server, or no scope
        guild = bot.settings.guild_id
        where = f"server {guild} (MUSICBOT_GUILD_ID)" if guild is not None else "this application"
        raise StartupError(
            f"Discord refused the command sync for {where} (403 {exc.text or 'Forbidden'}): invite the"
            " bot to that server with the bot and applications.commands scopes, or fix MUSICBOT_GUILD_ID"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise StartupError(f"cannot reach Discord to log in: {exc}") from None


def make_worker_factory(settings: Settings, *, quiet: bool = False) -> WorkerFactory:
    """Workers whose loader loads a size's source on first use (torch is imported only then).

    ``quiet`` silences transformers' own warnings and download bars (our log says what loads).
    """
    sizes: dict[str, str] = {}
    for size in MODEL_SIZES:
        sizes.setdefault(settings.model_source(size), size)

    def load(source: str) -> Engine:
        from generation.engine import load_engine

        if quiet:
            from generation.loader import quiet_transformers

            quiet_transformers()
        return load_engine(
            source,
            name=sizes.get(source, source),
            device=settings.device,
            dtype=settings.dtype,
            kernels=settings.kernels != "off",
        )

    def loader(source: str) -> Engine:
        main = load(source)
        if main.info.supports_melody:
            return main
        # A stereo model's melody requests go to the stereo melody model: the track stays stereo.
        size = melody_size_for(main.info.channels)
        return MelodyRouter(main, lambda: load(settings.model_source(size)), model_variable(size))

    return lambda: GenerationWorker(loader)
