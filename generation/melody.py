"""Melody references: decode, check, mix to mono, resample, and turn into chroma in pure torch.

transformers' MusicGen-Melody feature extractor needs torchaudio, which has no CPU build for this
torch; the same chroma (a power spectrogram folded onto 12 pitch classes, one-hot per frame) is a few
lines of torch and matches it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from generation import audio as audio_ops
from generation.errors import AudioInputError
from generation.request import AudioClip

if TYPE_CHECKING:
    import torch

MELODY_RATE = 32000
N_FFT = 16384
HOP = 4096
USED_SECONDS = 30.0  # the model's chroma covers 30 s; the rest of a reference is not used
MAX_SECONDS = 600.0  # longer files are refused outright rather than decoded for nothing
MAX_BYTES = 20 * 2**20
SILENCE_PEAK = 1e-4  # about -80 dBFS


@dataclass(frozen=True, eq=False)
class MelodyReference:
    """A usable reference: mono at the melody rate, at most ``USED_SECONDS``; ``note`` tells what was cut."""

    clip: AudioClip
    original_seconds: float
    note: str | None = None


def load_melody(
    data: bytes, *, max_bytes: int = MAX_BYTES, max_seconds: float = MAX_SECONDS
) -> MelodyReference:
    """Check and prepare a reference file; every refusal is an ``AudioInputError`` with its own message."""
    clip = audio_ops.decode_audio(data, max_bytes=max_bytes, max_seconds=max_seconds, name="melody")
    return prepare_melody(clip, max_seconds=max_seconds)


def prepare_melody(clip: AudioClip, *, max_seconds: float = MAX_SECONDS) -> MelodyReference:
    seconds = clip.seconds
    if seconds > max_seconds:
        raise AudioInputError("too_long", f"the melody is {seconds:.0f} s long; at most {max_seconds:.0f} s")
    if seconds < 1.0:
        raise AudioInputError("too_short", f"the melody is too short ({seconds:.2f} s; at least 1 s)")
    mono = clip.mono()[: int(np.ceil(USED_SECONDS * clip.sample_rate))]
    if float(np.abs(mono).max()) < SILENCE_PEAK:
        raise AudioInputError("silent", "the melody is silent: record or upload a tune to follow")
    resampled = audio_ops.resample(mono[None], clip.sample_rate, MELODY_RATE)
    note = None
    if seconds > USED_SECONDS:
        note = f"the melody is {seconds:.0f} s long; only its first {USED_SECONDS:.0f} s are used"
    return MelodyReference(AudioClip(resampled, MELODY_RATE), seconds, note)


@lru_cache(maxsize=4)
def _filters(sample_rate: int, num_chroma: int) -> torch.Tensor:
    import torch
    from transformers.audio_utils import chroma_filter_bank

    bank = chroma_filter_bank(
        sampling_rate=sample_rate, num_frequency_bins=N_FFT, tuning=0, num_chroma=num_chroma
    )
    return torch.from_numpy(bank).float()


def chroma_features(clip: AudioClip, sample_rate: int = MELODY_RATE, num_chroma: int = 12) -> torch.Tensor:
    """One-hot chroma ``(frames, num_chroma)`` of a clip (mixed to mono and resampled to ``sample_rate``)."""
    import torch  # here only: checking a reference must not load the model stack

    mono = clip.mono()[None]
    if clip.sample_rate != sample_rate:
        mono = audio_ops.resample(mono, clip.sample_rate, sample_rate)
    wave = torch.from_numpy(np.ascontiguousarray(mono[0], dtype=np.float32))
    if wave.shape[-1] < N_FFT:
        pad = N_FFT - wave.shape[-1]
        wave = torch.nn.functional.pad(wave, (pad // 2, pad - pad // 2))
    window = torch.hann_window(N_FFT)
    spec = torch.stft(
        wave, N_FFT, hop_length=HOP, window=window, center=True, pad_mode="reflect", return_complex=True
    )
    power = (spec.abs() / window.pow(2).sum().sqrt()).pow(2)  # torchaudio's normalized=True, power=2
    raw = _filters(sample_rate, num_chroma) @ power
    norm = torch.nn.functional.normalize(raw, p=float("inf"), dim=0, eps=1e-6).T
    return torch.nn.functional.one_hot(norm.argmax(-1), num_chroma).float()
