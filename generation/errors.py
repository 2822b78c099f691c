"""Errors of the generation package: each one carries its data and reads well to a user."""

from __future__ import annotations


class GenerationError(Exception):
    """Root of every error this package raises on purpose."""


class InvalidRequest(GenerationError, ValueError):
    """A request parameter is out of range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ModelLoadError(GenerationError):
    """A model could not be loaded; the message says what to do about it."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(message)
        self.source = source


class ModelUnavailable(ModelLoadError):
    """The model is neither local nor cached, and the hub cannot be reached."""


class GenerationCancelled(GenerationError):
    """Generation was cancelled before it produced any audio."""

    def __init__(self, steps_done: int = 0) -> None:
        super().__init__("generation was cancelled")
        self.steps_done = steps_done


class OutOfMemory(GenerationError):
    """The device ran out of memory for this batch; a smaller one may fit."""

    def __init__(self, batch_size: int) -> None:
        super().__init__(f"the device ran out of memory for a batch of {batch_size}")
        self.batch_size = batch_size


class AudioInputError(GenerationError, ValueError):
    """A reference or source audio file cannot be used; the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NonFiniteScores(GenerationError):
    """The model's scores for the next token held NaN or infinity: its weights or their precision fail."""

    def __init__(self, places: int) -> None:
        super().__init__(
            f"the model's scores went NaN or infinite ({places} of a step's token choices): its weights or"
            " their precision are broken; try MUSICBOT_DTYPE=float32 or another checkpoint"
        )
        self.places = places
