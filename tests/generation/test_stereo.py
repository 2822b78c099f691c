"""Stereo MusicGen (two channels of codebooks, interleaved L1 R1 L2 R2 ...) through every feature."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from generation import AudioClip, GenerationRequest, ModelLoadError
from generation.audio import TRUE_PEAK_CEILING_DB, db_to_gain, encode_audio, loudness, true_peak
from generation.engine import SEAM_SECONDS, MusicGenEngine, load_engine
from generation.random_models import save_model, tiny_architecture
from tests.generation.codes import codes_from_generate, our_codes
from tests.generation.test_long_tracks import MAX_TONE_STEP, TonalCodec


@pytest.fixture(scope="module")
def wide_stereo_engine(tmp_path_factory: pytest.TempPathFactory) -> MusicGenEngine:
    """A second stereo shape: other widths, three heads, three layers, 2 codebooks per channel."""
    arch = tiny_architecture(stereo=True)
    arch["decoder"].update(
        hidden_size=96, num_attention_heads=3, num_hidden_layers=3, ffn_dim=160, num_codebooks=4
    )
    arch["audio_encoder"]["target_bandwidths"] = [0.6]  # 2 quantizers: 2 x 50 frames/s x 6 bits
    directory = save_model(arch, tmp_path_factory.mktemp("models") / "wide-stereo", seed=3)
    return load_engine(str(directory), name="wide-stereo", device="cpu", dtype="float32")


def test_the_stereo_model_is_known_as_such(tiny_stereo_engine: MusicGenEngine) -> None:
    engine = tiny_stereo_engine
    assert (engine.channels, engine.codebooks, engine.channel_codebooks) == (2, 8, 4)
    assert engine.info.channels == 2


@pytest.mark.parametrize("seconds", [2.5, 45.0])
def test_stereo_tracks_last_exactly_what_was_asked(
    tiny_stereo_engine: MusicGenEngine, seconds: float
) -> None:
    [result] = tiny_stereo_engine.generate([GenerationRequest("calm piano", duration=seconds, seed=1)])
    audio = result.tracks[0].audio
    assert audio.shape == (2, round(seconds * 32000))
    assert result.channels == 2


def test_left_and_right_differ(tiny_stereo_engine: MusicGenEngine) -> None:
    [result] = tiny_stereo_engine.generate([GenerationRequest("wide synth pad", duration=2, seed=4)])
    left, right = result.tracks[0].audio
    assert np.abs(left - right).max() > 0.05  # two channels of their own, not a copied mono one
    assert np.abs(left).max() > 0.05 and np.abs(right).max() > 0.05


@pytest.mark.parametrize("engine_name", ["tiny_stereo_engine", "wide_stereo_engine"])
def test_greedy_stereo_codes_match_transformers_generate(
    engine_name: str, request: pytest.FixtureRequest
) -> None:
    engine = request.getfixturevalue(engine_name)
    prompts = ["calm lo-fi piano with rain", "rock"]
    expected = codes_from_generate(engine, prompts, 40)
    assert expected.shape[1] == engine.codebooks
    assert torch.equal(our_codes(engine, prompts, 40), expected)


@pytest.mark.parametrize("engine_name", ["tiny_stereo_engine", "wide_stereo_engine"])
def test_audio_prompted_greedy_stereo_codes_match_transformers_generate(
    engine_name: str, request: pytest.FixtureRequest
) -> None:
    engine = request.getfixturevalue(engine_name)
    prompts = ["jazz trio", "hip hop beat with vinyl crackle"]
    audio = (np.random.default_rng(0).standard_normal((2, 2, 32000)) * 0.1).astype(np.float32)
    expected = codes_from_generate(
        engine,
        prompts,
        30,
        input_values=torch.from_numpy(audio),
        padding_mask=torch.ones(2, 32000, dtype=torch.long),
    )
    ours = our_codes(engine, prompts, 30, audio)
    assert ours.shape[-1] == 50 + 30
    assert torch.equal(ours, expected)


def test_stereo_codes_decode_channel_by_channel_like_transformers(tiny_stereo_engine: MusicGenEngine) -> None:
    engine = tiny_stereo_engine
    codes = torch.randint(0, 64, (2, 8, 25))
    ours = engine.codes_to_audio(codes)
    with torch.inference_mode():
        decode = engine.model.audio_encoder.decode
        left = decode(codes[None, :, ::2], [None, None]).audio_values
        right = decode(codes[None, :, 1::2], [None, None]).audio_values
    np.testing.assert_allclose(ours, torch.cat([left, right], dim=1).numpy(), atol=1e-5)


def test_variations_and_batches_are_stereo(tiny_stereo_engine: MusicGenEngine) -> None:
    first = GenerationRequest("piano", duration=1.5, seed=3, variations=2)
    second = GenerationRequest("drums and bass", duration=1.5, seed=9)
    results = tiny_stereo_engine.generate([first, second])
    shapes = [t.audio.shape for r in results for t in r.tracks]
    assert shapes == [(2, 48000)] * 3
    [alone] = tiny_stereo_engine.generate([second])
    np.testing.assert_allclose(results[1].tracks[0].audio, alone.tracks[0].audio, atol=1e-5)


def test_extending_a_stereo_track_keeps_it_and_stays_stereo(tiny_stereo_engine: MusicGenEngine) -> None:
    [first] = tiny_stereo_engine.generate([GenerationRequest("reggae groove", duration=4, seed=5)])
    original = first.tracks[0].audio
    request = GenerationRequest("reggae groove", duration=3, seed=6, continuation=AudioClip(original, 32000))
    [extended] = tiny_stereo_engine.generate([request])
    audio = extended.tracks[0].audio
    assert audio.shape == (2, original.shape[-1] + 3 * 32000)
    kept = original.shape[-1] - int(SEAM_SECONDS * 32000)
    assert np.array_equal(audio[:, :kept], original[:, :kept])
    new = audio[:, original.shape[-1] :]
    assert np.abs(new[0] - new[1]).max() > 0.05
    assert extended.notes == ()


def test_a_mono_original_given_to_the_stereo_model_is_widened(tiny_stereo_engine: MusicGenEngine) -> None:
    rng = np.random.default_rng(1)
    mono = (0.3 * rng.standard_normal((1, 2 * 32000))).astype(np.float32)
    request = GenerationRequest("folk", duration=2, seed=2, continuation=AudioClip(mono, 32000))
    [extended] = tiny_stereo_engine.generate([request])
    audio = extended.tracks[0].audio
    assert audio.shape == (2, 4 * 32000)
    kept = mono.shape[-1] - int(SEAM_SECONDS * 32000)
    assert np.array_equal(audio[0, :kept], mono[0, :kept]) and np.array_equal(audio[1, :kept], mono[0, :kept])
    assert extended.notes == ("the mono original was widened to stereo: the tiny-stereo model makes stereo",)


def test_a_stereo_original_given_to_a_mono_model_is_mixed_down(tiny_engine: MusicGenEngine) -> None:
    rng = np.random.default_rng(2)
    stereo = (0.3 * rng.standard_normal((2, 2 * 32000))).astype(np.float32)
    request = GenerationRequest("folk", duration=2, seed=2, continuation=AudioClip(stereo, 32000))
    [extended] = tiny_engine.generate([request])
    audio = extended.tracks[0].audio
    assert audio.shape == (1, 4 * 32000)
    kept = stereo.shape[-1] - int(SEAM_SECONDS * 32000)
    np.testing.assert_allclose(audio[0, :kept], stereo.mean(axis=0)[:kept], atol=1e-6)
    assert extended.notes == ("the stereo original was mixed down to mono: the tiny model makes mono",)


def test_a_stereo_loop_wraps_around_smoothly_on_both_channels(
    tiny_stereo_engine: MusicGenEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny_stereo_engine, "codes_to_audio", TonalCodec(tiny_stereo_engine.hop, channels=2))
    [result] = tiny_stereo_engine.generate([GenerationRequest("loop", duration=4.01, seed=3, loop=True)])
    audio = result.tracks[0].audio
    assert audio.shape == (2, round(4.01 * 32000))
    for channel in audio:
        inside = np.abs(np.diff(channel)).max()
        assert abs(float(channel[0] - channel[-1])) <= inside  # the seam blended on this channel too


def test_stereo_long_track_seams_are_cross_faded_on_both_channels(
    tiny_stereo_engine: MusicGenEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny_stereo_engine, "codes_to_audio", TonalCodec(tiny_stereo_engine.hop, channels=2))
    [result] = tiny_stereo_engine.generate([GenerationRequest("pad", duration=35, seed=11)])
    audio = result.tracks[0].audio
    for channel in audio:
        level = np.abs(channel[32000:-32000]).max()
        assert np.abs(np.diff(channel))[32000:-32000].max() <= 1.2 * MAX_TONE_STEP * level


def test_stereo_finishing_meets_loudness_and_each_channels_true_peak(
    tiny_stereo_engine: MusicGenEngine,
) -> None:
    [result] = tiny_stereo_engine.generate([GenerationRequest("loud rock", duration=3, seed=6)])
    audio = result.tracks[0].audio
    assert loudness(audio, 32000) == pytest.approx(-14.0, abs=0.5)  # BS.1770 over both channels
    for channel in audio:
        assert true_peak(channel[None], 32000) <= db_to_gain(TRUE_PEAK_CEILING_DB) + 1e-6
        assert np.abs(channel[:8]).max() < 0.02 * np.abs(channel).max()  # faded in on each channel


def test_stereo_cancel_returns_partial_stereo_audio(tiny_stereo_engine: MusicGenEngine) -> None:
    cancel = threading.Event()

    def on_step(done: int, total: int) -> None:
        if done == 60:
            cancel.set()

    [result] = tiny_stereo_engine.generate(
        [GenerationRequest("drums", duration=7, seed=2)], progress=on_step, cancel=cancel
    )
    assert result.cancelled
    assert result.tracks[0].audio.shape[0] == 2
    assert 0 < result.tracks[0].samples < 7 * 32000


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_stereo_files_decode_with_two_channels(tiny_stereo_engine: MusicGenEngine, fmt: str) -> None:
    [result] = tiny_stereo_engine.generate([GenerationRequest("lo-fi beat", duration=2.5, seed=5)])
    data = encode_audio(result.tracks[0].audio, 32000, fmt)
    info = sf.info(io.BytesIO(data))
    assert (info.channels, info.samplerate, info.frames, info.subtype) == (2, 32000, 80000, "PCM_16")


def test_the_stereo_melody_model_follows_a_melody_in_stereo(tmp_path: Path) -> None:
    directory = save_model(tiny_architecture(melody=True, stereo=True), tmp_path / "stereo-melody")
    engine = load_engine(str(directory), name="stereo-melody", device="cpu", dtype="float32")
    assert engine.info.supports_melody and engine.info.channels == 2
    t = np.arange(2 * 32000) / 32000
    tune = AudioClip((0.5 * np.sin(2 * np.pi * 440.0 * t))[None].astype(np.float32), 32000)
    [result] = engine.generate([GenerationRequest("folk", duration=2, seed=1, melody=tune)])
    assert result.tracks[0].audio.shape == (2, 64000)


def test_the_bf16_stereo_engine_makes_stereo(tiny_stereo_dir: Path) -> None:
    engine = load_engine(str(tiny_stereo_dir), name="tiny-stereo", device="cpu", dtype="bfloat16")
    [result] = engine.generate([GenerationRequest("piano", duration=1.5, seed=1, variations=2)])
    assert [t.audio.shape for t in result.tracks] == [(2, 48000)] * 2


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"audio_channels": 3, "num_codebooks": 12}, r"2 \(stereo\) audio channels, got 3"),
        ({"num_codebooks": 6}, "3 codebooks per channel but its EnCodec encodes 4"),
    ],
)
def test_a_checkpoint_the_engine_cannot_serve_is_refused_when_it_loads(
    tmp_path: Path, change: dict[str, int], named: str
) -> None:
    directory = save_model(tiny_architecture(stereo=True), tmp_path / "odd")
    config = json.loads((directory / "config.json").read_text())  # as a hand-edited checkpoint would be
    config["decoder"].update(change)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=named):
        load_engine(str(directory), device="cpu", dtype="float32")
