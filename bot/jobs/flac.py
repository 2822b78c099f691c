"""How the service stores audio: 16-bit FLAC, the same samples the user was sent as 16-bit WAV."""

from __future__ import annotations

import numpy as np

from generation import AudioClip
from generation.audio import decode_audio, encode_audio


def to_flac(samples: np.ndarray, sample_rate: int) -> bytes:
    """FLAC bytes of float ``(channels, n)`` audio (clipped to full scale)."""
    return encode_audio(samples, sample_rate, "flac")


def from_flac(data: bytes) -> AudioClip:
    return decode_audio(data)
