"""The one worker that owns the model: a thread of its own with an asyncio front.

Every model call (load, generate, release) runs in the worker's thread, in order; callers on the
event loop await futures resolved with ``call_soon_threadsafe`` (aiosqlite's design). The event loop
never touches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from generation.errors import GenerationError, ModelLoadError, OutOfMemory
from generation.request import GenerationRequest, GenerationResult, ModelInfo

log = logging.getLogger(__name__)

T = TypeVar("T")
ProgressFn = Callable[[int, int], None]


class Engine(Protocol):
    """A loaded model that turns compatible requests into results (the real one: ``MusicGenEngine``)."""

    info: ModelInfo

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> list[GenerationResult]: ...

    def close(self) -> None: ...


EngineLoader = Callable[[str], Engine]


class WorkerDied(GenerationError):
    """The worker thread is gone; nothing queued on it will run."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the generation worker stopped: {reason}")
        self.reason = reason


_STOP = object()


class GenerationWorker:
    """Owns one engine in one thread; every call is queued to that thread."""

    def __init__(self, loader: EngineLoader, *, name: str = "generation-worker") -> None:
        self._loader = loader
        self._calls: queue.Queue[Any] = queue.Queue()
        self._engine: Engine | None = None
        self._key: str | None = None
        self._dead: WorkerDied | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def info(self) -> ModelInfo | None:
        engine = self._engine
        return engine.info if engine is not None else None

    @property
    def alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    async def start(self, source: str) -> ModelInfo:
        """Load the first model."""
        return await self.switch_model(source)

    async def switch_model(self, source: str) -> ModelInfo:
        """Load ``source`` after the calls queued before it; on failure the old model stays."""
        return await self._call(self._switch, source)

    async def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> list[GenerationResult]:
        """Generate a compatible batch; ``progress`` is called on the event loop."""
        loop = asyncio.get_running_loop()
        on_step = None
        if progress is not None:

            def on_step(done: int, total: int) -> None:
                loop.call_soon_threadsafe(progress, done, total)

        return await self._call(self._generate, list(requests), on_step, cancel)

    async def close(self) -> None:
        """Finish queued calls, release the model and stop the thread."""
        if self._abandoned:
            return
        if self._thread.is_alive():
            self._calls.put(_STOP)
            await asyncio.to_thread(self._thread.join)

    def abandon(self, reason: str) -> None:
        """Give up on a thread stuck in a call: queued calls fail now, and no call is taken any more.

        A Python thread cannot be killed. The stuck call runs on until it returns (an engine that
        honours its cancel event returns soon); then the thread releases its model and ends. Until
        then the model's memory stays taken: a new worker may not have room for another copy.
        """
        self._abandoned = True
        self._dead = self._dead or WorkerDied(reason)
        self._fail_pending()
        self._calls.put(_STOP)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.alive:
            raise self._dead or WorkerDied("it was closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((loop, future, fn, args))
        return await future

    # --- everything below runs in the worker thread ---

    def _run(self) -> None:
        reason = "it was closed"
        try:
            while True:
                item = self._calls.get()
                if item is _STOP:
                    break
                loop, future, fn, args = item
                try:
                    result = fn(*args)
                except Exception as exc:  # the caller's to handle
                    _resolve(loop, future, exc=exc)
                except BaseException as exc:  # SystemExit and the like end the thread
                    reason = f"{type(exc).__name__} in the worker"
                    log.critical("the generation worker stops: %s", reason, exc_info=exc)
                    self._dead = WorkerDied(reason)
                    _resolve(loop, future, exc=self._dead)
                    return
                else:
                    _resolve(loop, future, result=result)
        finally:
            self._dead = self._dead or WorkerDied(reason)
            self._release()
            self._fail_pending()

    def _switch(self, source: str) -> ModelInfo:
        old, old_key = self._engine, self._key
        if old is not None:
            # Release first: two big models rarely fit in memory at once. Reload the old one on failure.
            self._engine = None
            old.close()
        try:
            self._engine, self._key = self._loader(source), source
        except Exception as exc:
            if old is None or old_key is None:
                raise
            log.warning("loading %s failed (%s); reloading %s", source, exc, old_key)
            self._engine = self._loader(old_key)
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(source, f"could not load {source}: {exc}") from exc
        log.info(
            "model %s loaded (%s, %s)",
            self._engine.info.name,
            self._engine.info.device,
            self._engine.info.dtype,
        )
        return self._engine.info

    def _generate(
        self, requests: list[GenerationRequest], progress: ProgressFn | None, cancel: threading.Event | None
    ) -> list[GenerationResult]:
        if self._engine is None:
            raise GenerationError("no model is loaded")
        try:
            return self._engine.generate(requests, progress, cancel)
        except OutOfMemory:
            if len(requests) == 1:
                raise
            half = len(requests) // 2
            log.warning(
                "out of memory for a batch of %d requests; retrying as %d + %d",
                len(requests),
                half,
                len(requests) - half,
            )
            return self._generate(requests[:half], progress, cancel) + self._generate(
                requests[half:], progress, cancel
            )

    def _release(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            try:
                engine.close()
            except Exception:
                log.exception("releasing the model failed")

    def _fail_pending(self) -> None:
        while True:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                loop, future, _fn, _args = item
                _resolve(loop, future, exc=self._dead)


def _resolve(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    *,
    result: Any = None,
    exc: BaseException | None = None,
) -> None:
    def settle() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(settle)
