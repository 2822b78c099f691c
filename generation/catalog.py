"""Every published MusicGen checkpoint, by the name people use for it. Imports nothing heavy.

The sizes people type (``small``, ``stereo-melody-large``) map to Meta's hub ids; settings may point a
size at another hub id or a local directory. Any other checkpoint with the MusicGen or MusicGen-Melody
architecture loads by its hub id or path; the engine reads its channels and codebooks from its config.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Checkpoint:
    """One published checkpoint: its size name, hub id and what it needs."""

    size: str
    source: str
    parameters: float  # billions: text encoder, decoder and EnCodec together
    channels: int
    melody: bool

    @property
    def memory_gb(self) -> float:
        """The weights' size in 16-bit floats (bf16 / fp16), the least memory the model needs."""
        return self.parameters * 2

    def describe(self) -> str:
        """``stereo, 0.6 B parameters, about 1.2 GB (fp32: 2.4 GB)``."""
        kind = ("stereo" if self.channels == 2 else "mono") + (", follows a melody" if self.melody else "")
        return (
            f"{kind}, {self.parameters:.1f} B parameters, about {self.memory_gb:.1f} GB "
            f"(fp32: {2 * self.memory_gb:.1f} GB)"
        )


def _published(size: str, parameters: float) -> Checkpoint:
    return Checkpoint(
        size=size,
        source=f"facebook/musicgen-{size}",
        parameters=parameters,
        channels=2 if size.startswith("stereo-") else 1,
        melody="melody" in size,
    )


# Parameters counted on the real architectures (generation.random_models) with random weights.
CHECKPOINTS = (
    _published("small", 0.59),
    _published("medium", 2.01),
    _published("large", 3.42),
    _published("melody", 1.55),
    _published("melody-large", 2.62),
    _published("stereo-small", 0.60),
    _published("stereo-medium", 2.03),
    _published("stereo-large", 3.46),
    _published("stereo-melody", 1.58),
    _published("stereo-melody-large", 2.65),
)
SIZES = tuple(c.size for c in CHECKPOINTS)
_BY_SIZE = {c.size: c for c in CHECKPOINTS}


def checkpoint(size: str) -> Checkpoint | None:
    """The published checkpoint of this size name (None: not a size name)."""
    return _BY_SIZE.get(size)


def melody_size_for(channels: int) -> str:
    """The melody checkpoint that serves melody requests for a model of ``channels``: stereo stays stereo."""
    return "stereo-melody" if channels == 2 else "melody"
