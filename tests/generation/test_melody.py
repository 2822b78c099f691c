"""Melody references: decoding, checks with their own messages, chroma, and melody-conditioned generation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from generation import AudioClip, AudioInputError, GenerationRequest, SamplingParams
from generation.engine import load_engine
from generation.melody import chroma_features, load_melody


def _sweep(rate: int, seconds: float = 6.0) -> np.ndarray:
    """A log sine sweep 110 Hz → 880 Hz: every pitch class in turn."""
    t = np.arange(int(rate * seconds)) / rate
    f0, f1 = 110.0, 880.0
    k = np.log(f1 / f0) / seconds
    return (0.5 * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)).astype(np.float32)


def _file(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype="PCM_16" if fmt in ("WAV", "FLAC") else None)
    return buf.getvalue()


def _reference_chroma() -> torch.Tensor:
    return chroma_features(AudioClip(_sweep(32000)[None], 32000))


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_stereo_44k_reference_gives_the_chroma_of_the_same_audio_at_32k(fmt: str) -> None:
    mono = _sweep(44100)
    stereo = np.stack([mono, mono], axis=1)  # a stereo file of the same tune
    reference = load_melody(_file(stereo, 44100, fmt))
    assert reference.clip.sample_rate == 32000 and reference.clip.samples.shape[0] == 1
    expected = _reference_chroma()
    got = chroma_features(reference.clip)
    assert got.shape == expected.shape == ((6 * 32000) // 4096 + 1, 12)
    assert torch.equal(got, expected)
    assert len(set(expected.argmax(-1).tolist())) == 12  # the sweep really crosses every pitch class


def test_text_renamed_wav_is_not_audio(tmp_path: Path) -> None:
    fake = tmp_path / "tune.wav"
    fake.write_text("this is a shopping list, not a tune\n" * 50)
    with pytest.raises(AudioInputError, match="not audio") as err:
        load_melody(fake.read_bytes())
    assert err.value.reason == "not_audio"


def test_oversized_reference_is_refused() -> None:
    with pytest.raises(AudioInputError, match="too large") as err:
        load_melody(_file(_sweep(32000), 32000, "WAV"), max_bytes=100_000)
    assert err.value.reason == "too_large"


def test_long_reference_uses_its_first_30_seconds_and_says_so() -> None:
    data = _file(np.tile(_sweep(16000), 15), 16000, "FLAC")  # 90 s
    reference = load_melody(data)
    assert reference.original_seconds == pytest.approx(90)
    assert reference.clip.seconds == pytest.approx(30)
    assert reference.note == "the melody is 90 s long; only its first 30 s are used"


def test_very_long_reference_is_refused() -> None:
    with pytest.raises(AudioInputError, match="at most 60 s") as err:
        load_melody(_file(np.tile(_sweep(8000), 15), 8000, "FLAC"), max_seconds=60)
    assert err.value.reason == "too_long"


def test_silent_reference_is_refused() -> None:
    with pytest.raises(AudioInputError, match="silent") as err:
        load_melody(_file(np.zeros(32000 * 3, np.float32), 32000, "WAV"))
    assert err.value.reason == "silent"


def test_melody_model_follows_a_reference(tiny_melody_dir: Path) -> None:
    engine = load_engine(str(tiny_melody_dir), name="melody", device="cpu", dtype="float32")
    clip = load_melody(_file(_sweep(32000), 32000, "WAV")).clip
    # Greedy: a random model's near-uniform distributions hide small changes from sampling.
    greedy = SamplingParams(top_k=1)
    [with_melody] = engine.generate(
        [GenerationRequest("folk song", duration=2, sampling=greedy, melody=clip)]
    )
    [without] = engine.generate([GenerationRequest("folk song", duration=2, sampling=greedy)])
    assert with_melody.tracks[0].samples == 64000
    assert not np.array_equal(with_melody.tracks[0].audio, without.tracks[0].audio)
