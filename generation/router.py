"""An engine that serves melody requests on a second model, loaded beside the first when needed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from threading import Event

from generation.errors import ModelLoadError
from generation.request import GenerationRequest, GenerationResult
from generation.worker import Engine

log = logging.getLogger(__name__)


class MelodyRouter:
    """The current model, plus the melody model for requests that carry a melody.

    The melody model is loaded on the first such request, beside the current one, and released with it
    (when the model is switched or the bot stops). If it cannot be loaded, that job fails saying why.
    """

    def __init__(
        self, main: Engine, load_melody: Callable[[], Engine], setting: str = "MUSICBOT_MODEL_MELODY"
    ) -> None:
        self._main = main
        self._load_melody = load_melody
        self._setting = setting  # where the owner points the melody model, for the message
        self._melody: Engine | None = None
        self.info = replace(main.info, supports_melody=True)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: Callable[[int, int], None] | None = None,
        cancel: Event | None = None,
    ) -> list[GenerationResult]:
        if any(request.melody is not None for request in requests):
            return self._melody_engine().generate(requests, progress, cancel)
        return self._main.generate(requests, progress, cancel)

    def close(self) -> None:
        melody, self._melody = self._melody, None
        try:
            if melody is not None:
                melody.close()
        finally:
            self._main.close()

    def _melody_engine(self) -> Engine:
        if self._melody is None:
            try:
                melody = self._load_melody()
            except Exception as exc:
                source = exc.source if isinstance(exc, ModelLoadError) else "melody"
                raise ModelLoadError(source, f"the melody model is not available: {exc}") from exc
            if not melody.info.supports_melody:
                melody.close()
                raise ModelLoadError(
                    melody.info.source,
                    f"the melody model is not available: {self._setting} ({melody.info.source})"
                    " is not a MusicGen-Melody checkpoint",
                )
            self._melody = melody
            log.info("melody model loaded beside %s", self.info.name)
        return self._melody
