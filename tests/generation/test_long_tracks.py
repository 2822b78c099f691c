"""Tracks longer than one pass, extensions and loops, on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generation import AudioClip, GenerationRequest
from generation.engine import SEAM_SECONDS, MusicGenEngine


def _seam_starts(engine: MusicGenEngine, request: GenerationRequest, start: float = 0.0) -> list[int]:
    """Where each window's cross-fade begins, in samples."""
    made, starts = start, []
    for window in engine._windows(request):
        if window.context:
            starts.append(int((made - SEAM_SECONDS) * engine.sample_rate))
            made += window.new - SEAM_SECONDS
        else:
            made += window.new
    return starts


class TonalCodec:
    """Stands in for EnCodec's decoder: every window becomes a 220 Hz tone with a phase of its own.

    The tiny model's random EnCodec makes noise, in which a hard cut cannot be seen; a tone shows any
    step at a seam (a cut between two phases jumps by up to the full amplitude).
    """

    def __init__(self, hop: int, channels: int = 1) -> None:
        self.hop, self.channels = hop, channels
        self.rng = np.random.default_rng(0)

    def __call__(self, codes: torch.Tensor) -> np.ndarray:
        rows, _, frames = codes.shape
        t = np.arange(frames * self.hop) / 32000
        phases = self.rng.uniform(0, 2 * np.pi, size=(rows, self.channels, 1))  # one per row and channel
        return (0.5 * np.sin(2 * np.pi * 220.0 * t + phases)).astype(np.float32)


MAX_TONE_STEP = 2 * np.pi * 220.0 / 32000  # the largest sample-to-sample change of a full-scale 220 Hz tone


@pytest.mark.parametrize("seconds", [45.0, 75.0])
def test_long_track_is_exact_with_one_progress_bar(tiny_engine: MusicGenEngine, seconds: float) -> None:
    totals: list[int] = []
    [result] = tiny_engine.generate(
        [GenerationRequest("slow ambient pad", duration=seconds, seed=11)],
        progress=lambda done, total: totals.append(total),
    )
    assert result.tracks[0].samples == round(seconds * tiny_engine.sample_rate)
    assert len(set(totals)) == 1 and len(totals) == totals[0]


@pytest.mark.parametrize("seconds", [45.0, 75.0])
def test_long_track_seams_are_cross_faded(
    tiny_engine: MusicGenEngine, seconds: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny_engine, "codes_to_audio", TonalCodec(tiny_engine.hop))
    request = GenerationRequest("slow ambient pad", duration=seconds, seed=11)
    [result] = tiny_engine.generate([request])
    audio = result.tracks[0].audio[0]
    assert audio.shape[-1] == round(seconds * tiny_engine.sample_rate)
    seams = _seam_starts(tiny_engine, request)
    assert len(seams) == (3 if seconds > 60 else 1)
    steps = np.abs(np.diff(audio))
    level = np.abs(audio[32000:-32000]).max()  # the finished track's gain, away from the fades
    assert steps[32000:-32000].max() <= 1.2 * MAX_TONE_STEP * level  # no step anywhere, seams included


def test_variations_of_a_long_track_are_one_batch(tiny_engine: MusicGenEngine) -> None:
    [result] = tiny_engine.generate([GenerationRequest("chiptune", duration=35, seed=1, variations=2)])
    assert [t.samples for t in result.tracks] == [35 * 32000] * 2
    assert not np.array_equal(result.tracks[0].audio, result.tracks[1].audio)


def test_extension_keeps_the_original_and_adds_the_seconds(tiny_engine: MusicGenEngine) -> None:
    [first] = tiny_engine.generate([GenerationRequest("reggae groove", duration=4, seed=5)])
    original = first.tracks[0].audio
    request = GenerationRequest("reggae groove", duration=3, seed=6, continuation=AudioClip(original, 32000))
    [extended] = tiny_engine.generate([request])
    audio = extended.tracks[0].audio
    assert audio.shape[-1] == original.shape[-1] + 3 * 32000
    kept = original.shape[-1] - int(SEAM_SECONDS * 32000)
    assert np.array_equal(audio[..., :kept], original[..., :kept])
    assert np.abs(audio[..., original.shape[-1] :]).max() > 0.05


def test_loop_is_exact_and_wraps_around_smoothly(
    tiny_engine: MusicGenEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny_engine, "codes_to_audio", TonalCodec(tiny_engine.hop))
    [result] = tiny_engine.generate([GenerationRequest("game loop", duration=4.01, seed=3, loop=True)])
    audio = result.tracks[0].audio[0]
    assert audio.shape[-1] == round(4.01 * 32000)
    inside = np.abs(np.diff(audio)).max()
    assert abs(float(audio[0] - audio[-1])) <= inside  # the wrap-around is as smooth as the inside
    assert inside <= 1.2 * MAX_TONE_STEP * np.abs(audio).max()
    assert np.abs(audio[:100]).max() > 0.1 * np.abs(audio).max()  # no fade to silence at the loop point


def test_real_codec_loop_has_exact_length(tiny_engine: MusicGenEngine) -> None:
    [result] = tiny_engine.generate([GenerationRequest("game loop", duration=4, seed=3, loop=True)])
    assert result.tracks[0].samples == 4 * 32000
