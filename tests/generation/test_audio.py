"""Finishing and encoding: loudness, true peak, fades, seams, loops."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from generation import AudioInputError
from generation.audio import (
    TARGET_LUFS,
    TRUE_PEAK_CEILING_DB,
    decode_audio,
    encode_audio,
    finish,
    join,
    loudness,
    make_loop,
    true_peak,
)

RATE = 32000


def _music(seconds: float, level: float, seed: int = 0) -> np.ndarray:
    """A chord with a slow tremolo and a little noise: music-like crest factor."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    chord = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (220.0, 277.2, 329.6, 440.0))
    tremolo = 0.75 + 0.25 * np.sin(2 * np.pi * 0.5 * t)
    return (level * (chord * tremolo / 4 + 0.05 * rng.standard_normal(t.size)))[None].astype(np.float32)


@pytest.mark.parametrize("level", [0.02, 0.3, 3.0])
def test_normalised_loudness_is_on_target_under_the_peak_ceiling(level: float) -> None:
    out = finish(_music(8, level), RATE)
    assert loudness(out, RATE) == pytest.approx(TARGET_LUFS, abs=0.5)
    assert 20 * np.log10(true_peak(out, RATE)) <= TRUE_PEAK_CEILING_DB + 1e-3


def _drums(seconds: float, seed: int = 0) -> np.ndarray:
    """Kicks and hats over a quiet pad: a peak-to-loudness ratio a single gain cannot handle."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    out = 0.05 * np.sin(2 * np.pi * 110 * t)
    for start in np.arange(0, seconds, 0.5):
        n = np.arange(int(0.15 * RATE))
        i = int(start * RATE)
        kick = np.sin(2 * np.pi * 60 * n / RATE) * np.exp(-n / (0.03 * RATE))
        out[i : i + n.size] += kick[: out.size - i]
        j = i + int(0.25 * RATE)
        hat = rng.standard_normal(int(0.02 * RATE)) * np.exp(-np.arange(int(0.02 * RATE)) / 100)
        out[j : j + hat.size] += 0.3 * hat[: max(0, out.size - j)]
    return out[None].astype(np.float32)


def test_peaky_music_reaches_the_target_under_the_ceiling() -> None:
    audio = _drums(8)
    single_gain = audio * (10 ** (TRUE_PEAK_CEILING_DB / 20) / true_peak(audio, RATE))
    assert loudness(single_gain, RATE) < TARGET_LUFS - 1  # why a limiter is needed at all
    out = finish(audio, RATE)
    assert loudness(out, RATE) == pytest.approx(TARGET_LUFS, abs=0.5)
    assert 20 * np.log10(true_peak(out, RATE)) <= TRUE_PEAK_CEILING_DB + 1e-3


def test_spiky_audio_is_held_under_the_ceiling() -> None:
    audio = _music(5, 0.01)
    audio[0, RATE] = 1.5  # one huge click
    out = finish(audio, RATE)
    assert 20 * np.log10(true_peak(out, RATE)) <= TRUE_PEAK_CEILING_DB + 1e-3


def test_silence_stays_silent() -> None:
    out = finish(np.zeros((1, RATE), np.float32), RATE)
    assert not out.any()


def test_join_has_no_step_at_the_seam() -> None:
    a, b = _music(2, 0.3, seed=1), _music(2, 0.3, seed=2)
    joined = join(a, b, 8000)
    assert joined.shape[-1] == a.shape[-1] + b.shape[-1] - 8000
    seam = slice(a.shape[-1] - 8000 - 100, a.shape[-1] + 100)
    inside = max(np.abs(np.diff(a[0])).max(), np.abs(np.diff(b[0])).max())
    assert np.abs(np.diff(joined[0, seam])).max() <= inside  # no jump bigger than the tracks' own


def test_loop_wraps_around_smoothly_at_exact_length() -> None:
    audio = _music(3, 0.3)
    loop = make_loop(audio, 2 * RATE)
    assert loop.shape[-1] == 2 * RATE
    wrap = abs(float(loop[0, 0] - loop[0, -1]))
    assert wrap <= np.percentile(np.abs(np.diff(loop[0])), 99)


def test_encode_round_trips_through_soundfile() -> None:
    audio = _music(1, 0.3)
    for fmt in ("wav", "flac"):
        clip = decode_audio(encode_audio(audio, RATE, fmt))
        assert clip.sample_rate == RATE and clip.samples.shape == audio.shape
        np.testing.assert_allclose(clip.samples, audio, atol=1 / 32767)


def test_reencoding_a_decoded_track_changes_no_sample() -> None:
    audio = _music(1, 0.9)
    for fmt in ("wav", "flac"):
        first = encode_audio(audio, RATE, fmt)
        again = encode_audio(decode_audio(first).samples, RATE, fmt)
        a, _ = sf.read(io.BytesIO(first), dtype="int16")
        b, _ = sf.read(io.BytesIO(again), dtype="int16")
        assert np.array_equal(a, b)


def test_encode_never_wraps_around_beyond_full_scale() -> None:
    data = encode_audio(np.array([[2.0, -2.0, 0.5]], np.float32), RATE)
    samples, _ = sf.read(io.BytesIO(data), dtype="int16")
    assert samples[0] == 32767 and samples[1] <= -32767 and samples[2] == 16384


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty"), (b"hello, this is plainly text and not a sound file" * 20, "not_audio")],
)
def test_decode_refuses_what_is_not_audio(data: bytes, reason: str) -> None:
    with pytest.raises(AudioInputError) as err:
        decode_audio(data)
    assert err.value.reason == reason


def test_decode_refuses_oversized_files() -> None:
    with pytest.raises(AudioInputError, match="too large") as err:
        decode_audio(b"\0" * 3000, max_bytes=2000)
    assert err.value.reason == "too_large"


def test_decode_refuses_a_file_whose_header_claims_too_much_before_reading_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = encode_audio(np.zeros((1, 3 * RATE), dtype=np.float32), RATE, "flac")
    assert decode_audio(data, max_seconds=3).seconds == 3.0

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the samples were read")

    monkeypatch.setattr("soundfile.SoundFile.read", no_reading)
    with pytest.raises(AudioInputError, match="the tune is 3 s long; at most 2 s") as err:
        decode_audio(data, max_seconds=2, name="tune")
    assert err.value.reason == "too_long"
