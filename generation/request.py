"""What crosses into the generation package (requests) and what comes back (results)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from generation.errors import InvalidRequest

MAX_PROMPT_CHARS = 400
MIN_DURATION = 1.0
MAX_VARIATIONS = 4
MAX_SEED = 2**31 - 1
MAX_TOP_K = 2048
MAX_GUIDANCE = 20.0
MAX_TEMPERATURE = 5.0


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, audiocraft's defaults; checked on construction."""

    guidance: float = 3.0
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.guidance <= MAX_GUIDANCE:
            raise InvalidRequest(
                "guidance", f"guidance must be between 1 and {MAX_GUIDANCE:g} (got {self.guidance:g})"
            )
        if not 0.0 < self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(
                "temperature",
                f"temperature must be above 0 and at most {MAX_TEMPERATURE:g} (got {self.temperature:g})",
            )
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidRequest("top_k", f"top_k must be between 0 (off) and {MAX_TOP_K} (got {self.top_k})")
        if not 0.0 <= self.top_p <= 1.0:
            raise InvalidRequest("top_p", f"top_p must be between 0 (off) and 1 (got {self.top_p:g})")


@dataclass(frozen=True, eq=False)
class AudioClip:
    """Audio as float32 ``(channels, samples)`` at ``sample_rate``."""

    samples: np.ndarray
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.samples.shape[-1] / self.sample_rate

    def mono(self) -> np.ndarray:
        return self.samples.mean(axis=0, dtype=np.float32)


@dataclass(frozen=True)
class GenerationRequest:
    """One piece of music to make: ``variations`` tracks from one prompt.

    ``continuation`` (audio to continue: extension) and ``melody`` (a reference tune) are optional.
    Variation ``i`` is sampled with ``seed + i``, so any track can be made again on its own.
    """

    prompt: str
    duration: float = 10.0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    variations: int = 1
    seed: int | None = None
    loop: bool = False
    continuation: AudioClip | None = field(default=None, compare=False)
    melody: AudioClip | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        prompt = self.prompt.strip() if isinstance(self.prompt, str) else ""
        if not prompt:
            raise InvalidRequest("prompt", "the prompt is empty: describe the music you want")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest(
                "prompt", f"the prompt is too long ({len(prompt)} characters; at most {MAX_PROMPT_CHARS})"
            )
        if any(ord(ch) < 32 and ch not in "\t\n" for ch in prompt):
            raise InvalidRequest("prompt", "the prompt contains control characters")
        object.__setattr__(self, "prompt", prompt)
        if not self.duration >= MIN_DURATION:
            raise InvalidRequest(
                "duration", f"duration must be at least {MIN_DURATION:g} s (got {self.duration:g} s)"
            )
        if not 1 <= self.variations <= MAX_VARIATIONS:
            raise InvalidRequest(
                "variations", f"variations must be between 1 and {MAX_VARIATIONS} (got {self.variations})"
            )
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequest("seed", f"seed must be between 0 and {MAX_SEED} (got {self.seed})")
        if self.loop and self.continuation is not None:
            raise InvalidRequest("loop", "a loop cannot also extend an existing track")

    def with_seed(self) -> GenerationRequest:
        """This request with a concrete seed (a random one when none was given)."""
        return self if self.seed is not None else replace(self, seed=random_seed())

    @property
    def row_seeds(self) -> tuple[int, ...]:
        base = self.seed if self.seed is not None else 0
        return tuple((base + i) % (MAX_SEED + 1) for i in range(self.variations))

    def batch_key(self) -> tuple[object, ...]:
        """Requests with equal keys can be generated together in one batch."""
        return (
            round(self.duration, 3),
            self.sampling,
            self.loop,
            self.continuation is None,
            self.melody is None,
        )


def check_batch(requests: Sequence[GenerationRequest]) -> None:
    if not requests:
        raise InvalidRequest("requests", "nothing to generate")
    key = requests[0].batch_key()
    if any(r.batch_key() != key for r in requests[1:]):
        raise InvalidRequest("requests", "requests of one batch must share duration, sampling and loop")
    if any(r.continuation is not None or r.melody is not None for r in requests) and len(requests) > 1:
        raise InvalidRequest("requests", "requests with audio input are generated one at a time")


@dataclass(frozen=True, eq=False)
class Track:
    """One finished track: float32 ``(channels, samples)``, never beyond full scale."""

    audio: np.ndarray
    seed: int

    @property
    def samples(self) -> int:
        return self.audio.shape[-1]


@dataclass(frozen=True, eq=False)
class GenerationResult:
    """The tracks made for one request, in variation order."""

    request: GenerationRequest
    tracks: tuple[Track, ...]
    sample_rate: int
    model: str
    elapsed: float
    cancelled: bool = False
    notes: tuple[str, ...] = ()  # what the engine did that the person did not ask for, in words

    @property
    def seconds(self) -> float:
        return self.tracks[0].samples / self.sample_rate if self.tracks else 0.0

    @property
    def channels(self) -> int:
        return self.tracks[0].audio.shape[0] if self.tracks else 0


@dataclass(frozen=True)
class ModelInfo:
    """What is loaded: the name users see, where it came from, and how it runs."""

    name: str
    source: str
    model_type: str
    device: str
    dtype: str
    sample_rate: int
    frame_rate: int
    max_seconds_per_pass: float
    supports_melody: bool
    channels: int = 1
