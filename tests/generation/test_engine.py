"""The engine on a tiny random MusicGen loaded through the production loader: what a user would notice."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from generation import (
    AudioClip,
    GenerationCancelled,
    GenerationRequest,
    InvalidRequest,
    ModelLoadError,
    ModelUnavailable,
    NonFiniteScores,
)
from generation.audio import encode_audio
from generation.engine import MusicGenEngine, cache_keyword, load_engine
from tests.generation.codes import codes_from_generate, our_codes


@pytest.mark.parametrize("seconds", [1.0, 2.5, 7.0])
def test_audio_lasts_exactly_what_was_asked(tiny_engine: MusicGenEngine, seconds: float) -> None:
    [result] = tiny_engine.generate([GenerationRequest("calm piano", duration=seconds, seed=1)])
    assert result.tracks[0].samples == round(seconds * tiny_engine.sample_rate)
    assert result.seconds == pytest.approx(seconds)


def test_same_seed_repeats_bit_for_bit(tiny_engine: MusicGenEngine) -> None:
    request = GenerationRequest("upbeat electronic dance", duration=1.5, seed=1234)
    [a] = tiny_engine.generate([request])
    [b] = tiny_engine.generate([request])
    assert np.array_equal(a.tracks[0].audio, b.tracks[0].audio)
    assert a.tracks[0].seed == 1234


def test_seed_is_reported_when_not_given(tiny_engine: MusicGenEngine) -> None:
    [result] = tiny_engine.generate([GenerationRequest("jazz trio", duration=1)])
    seed = result.tracks[0].seed
    [again] = tiny_engine.generate([GenerationRequest("jazz trio", duration=1, seed=seed)])
    assert np.array_equal(result.tracks[0].audio, again.tracks[0].audio)


def test_variations_differ_and_each_repeats_alone(tiny_engine: MusicGenEngine) -> None:
    [result] = tiny_engine.generate([GenerationRequest("rock anthem", duration=1.5, variations=3, seed=7)])
    audios = [t.audio for t in result.tracks]
    assert [t.seed for t in result.tracks] == [7, 8, 9]
    assert not np.array_equal(audios[0], audios[1])
    assert not np.array_equal(audios[1], audios[2])
    # The third variation made on its own, from its own seed, is the same music.
    [alone] = tiny_engine.generate([GenerationRequest("rock anthem", duration=1.5, seed=9)])
    np.testing.assert_allclose(alone.tracks[0].audio, audios[2], atol=1e-5)


def test_batch_padding_leaves_a_row_unchanged(tiny_engine: MusicGenEngine) -> None:
    short = GenerationRequest("piano", duration=1, seed=3)
    long = GenerationRequest(
        "epic orchestral soundtrack, strings and brass, cinematic and slow", duration=1, seed=4
    )
    [alone] = tiny_engine.generate([short])
    batch = tiny_engine.generate([short, long])
    assert [r.request.prompt for r in batch] == ["piano", long.prompt]
    np.testing.assert_allclose(batch[0].tracks[0].audio, alone.tracks[0].audio, atol=1e-5)


def test_wav_decodes_as_16_bit_pcm_at_model_rate(tiny_engine: MusicGenEngine) -> None:
    [result] = tiny_engine.generate([GenerationRequest("lo-fi beat", duration=2.5, seed=5)])
    data = encode_audio(result.tracks[0].audio, result.sample_rate, "wav")
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.subtype, info.format, info.frames) == (32000, "PCM_16", "WAV", 80000)
    flac = encode_audio(result.tracks[0].audio, result.sample_rate, "flac")
    assert sf.info(io.BytesIO(flac)).format == "FLAC"
    assert len(flac) < len(data)


def test_audio_never_clips_and_fades_in_and_out(tiny_engine: MusicGenEngine) -> None:
    [result] = tiny_engine.generate([GenerationRequest("loud rock", duration=2, seed=6, variations=2)])
    for track in result.tracks:
        audio = track.audio
        assert np.abs(audio).max() <= 1.0
        body = np.abs(audio[..., 3200:-3200]).max()
        assert body > 0.05
        assert np.abs(audio[..., :8]).max() < 0.02 * body  # fades in from silence
        assert np.abs(audio[..., -8:]).max() < 0.02 * body  # and out to it


def test_progress_counts_every_step(tiny_engine: MusicGenEngine) -> None:
    calls: list[tuple[int, int]] = []
    tiny_engine.generate(
        [GenerationRequest("ambient", duration=2, seed=1)], progress=lambda d, t: calls.append((d, t))
    )
    total = 2 * tiny_engine.frame_rate + tiny_engine.codebooks - 1
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_cancel_from_another_thread_returns_partial_audio(tiny_engine: MusicGenEngine) -> None:
    cancel = threading.Event()

    def on_step(done: int, total: int) -> None:
        if done == 60:
            threading.Thread(target=cancel.set).start()

    [result] = tiny_engine.generate(
        [GenerationRequest("drums", duration=7, seed=2)], progress=on_step, cancel=cancel
    )
    assert result.cancelled
    assert 0 < result.tracks[0].samples < 7 * 32000
    assert np.isfinite(result.tracks[0].audio).all()


def test_cancel_before_any_audio_raises_cancelled(tiny_engine: MusicGenEngine) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled):
        tiny_engine.generate([GenerationRequest("drums", duration=3, seed=2)], cancel=cancel)


def test_greedy_codes_match_transformers_generate(tiny_engine: MusicGenEngine) -> None:
    prompts = ["calm lo-fi piano with rain", "rock"]
    expected = codes_from_generate(tiny_engine, prompts, 60)
    assert torch.equal(our_codes(tiny_engine, prompts, 60), expected)


def test_audio_prompted_greedy_codes_match_transformers_generate(tiny_engine: MusicGenEngine) -> None:
    prompts = ["jazz trio", "hip hop beat with vinyl crackle"]
    audio = (np.random.default_rng(0).standard_normal((2, 1, 32000)) * 0.1).astype(np.float32)
    expected = codes_from_generate(
        tiny_engine,
        prompts,
        40,
        input_values=torch.from_numpy(audio),
        padding_mask=torch.ones(2, 32000, dtype=torch.long),
    )
    ours = our_codes(tiny_engine, prompts, 40, audio)
    assert ours.shape[-1] == 50 + 40  # the prompt's 50 frames (re-synthesised by EnCodec), then 40 new ones
    assert torch.equal(ours, expected)


def test_loader_picks_melody_class_from_checkpoint(tiny_melody_dir: Path) -> None:
    engine = load_engine(str(tiny_melody_dir), name="melody", device="cpu", dtype="float32")
    assert type(engine.model).__name__ == "MusicgenMelodyForConditionalGeneration"
    assert engine.info.supports_melody
    [result] = engine.generate([GenerationRequest("folk song", duration=1.5, seed=1)])
    assert result.tracks[0].samples == 48000


def test_text_model_refuses_a_melody(tiny_engine: MusicGenEngine) -> None:
    from generation import AudioClip

    melody = AudioClip(np.zeros((1, 32000), np.float32), 32000)
    with pytest.raises(InvalidRequest, match="melody model"):
        tiny_engine.generate([GenerationRequest("piano", duration=1, melody=melody)])


def test_missing_local_model_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match=r"config\.json"):
        load_engine(str(tmp_path / "nowhere"), device="cpu")


def test_uncached_hub_model_fails_at_once_when_offline() -> None:
    import time

    started = time.perf_counter()
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE") as err:
        load_engine("facebook/musicgen-small", device="cpu")
    assert time.perf_counter() - started < 2
    assert "local directory" in str(err.value)


def test_auto_placement_on_this_machine_is_cpu() -> None:
    from generation.loader import bf16_is_fast, choose_placement

    placement = choose_placement("auto", "auto")
    assert placement.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if placement.device.type == "cpu":
        assert placement.dtype == (torch.bfloat16 if bf16_is_fast() else torch.float32)


@pytest.mark.parametrize("kernels", [True, False], ids=["our-kernels", "no-kernels"])
def test_a_cpu_without_native_bf16_runs_bf16_on_our_kernels_and_float32_without_them(
    monkeypatch: pytest.MonkeyPatch, kernels: bool
) -> None:
    from generation import loader, native

    monkeypatch.setattr(loader, "cpu_supports_bf16", lambda: False)  # an AVX2 CPU
    monkeypatch.setattr(native, "load", lambda: object() if kernels else None)
    want = torch.bfloat16 if kernels else torch.float32
    assert loader.choose_placement("cpu", "auto").dtype == want
    int8 = loader.choose_placement("cpu", "int8")
    assert int8.int8_steps and int8.dtype == want  # bf16 activations: our int8 steps, else fbgemm's
    advice = loader.dtype_advice("cpu", "auto", loader.choose_placement("cpu", "auto"))
    assert (advice is None) == kernels
    assert kernels or "install g++" in str(advice)
    off = loader.choose_placement("cpu", "auto", kernels=False)  # MUSICBOT_KERNELS=off: torch's fp32
    assert off.dtype == torch.float32 and not off.kernels
    assert "our kernels are off (MUSICBOT_KERNELS=off)" in str(loader.dtype_advice("cpu", "auto", off))


def test_a_model_too_big_for_the_device_says_what_to_do(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from generation import loader

    def out_of_memory(model: object, placement: object) -> object:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loader, "place_model", out_of_memory)
    with pytest.raises(ModelLoadError, match="does not fit in the machine's memory: choose a smaller size"):
        load_engine(str(tiny_model_dir), device="cpu", dtype="float32")


def test_a_slow_automatic_choice_comes_with_advice() -> None:
    from generation.loader import Placement, dtype_advice, int8_supported

    fp32 = Placement(torch.device("cpu"), torch.float32)
    advice = dtype_advice("auto", "auto", fp32)
    assert advice is not None and advice.startswith("no CUDA GPU found; ")
    if int8_supported():
        assert "MUSICBOT_DTYPE=int8" in advice
    assert dtype_advice("cpu", "float32", fp32) is None  # asked for: nothing to say
    assert dtype_advice("auto", "auto", Placement(torch.device("cpu"), torch.bfloat16)) is None


def test_a_bf16_load_keeps_encodecs_weights_exactly_as_stored(tiny_model_dir: Path) -> None:
    fp32 = load_engine(str(tiny_model_dir), device="cpu", dtype="float32").model.audio_encoder
    bf16 = load_engine(str(tiny_model_dir), device="cpu", dtype="bfloat16").model
    assert next(bf16.decoder.parameters()).dtype == torch.bfloat16
    stored = dict(fp32.named_parameters())
    for name, weight in bf16.audio_encoder.named_parameters():
        assert weight.dtype == torch.float32 and torch.equal(weight, stored[name]), name


def test_scores_gone_nan_stop_the_job_with_advice_and_leave_the_engine_sound(
    tiny_engine: MusicGenEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose values overflow gives NaN logits: the job stops with a message a user can act
    on (the bot shows it as is), and the next job is unaffected."""
    from generation.engine import _Conditioning

    request = GenerationRequest("calm lo-fi piano", duration=1.0, seed=1)
    good = tiny_engine.generate([request])[0].tracks[0].audio
    honest = _Conditioning.step
    calls = 0

    def broken(self: _Conditioning, column: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        logits = honest(self, column)
        return logits.fill_(float("nan")) if calls == 3 else logits

    monkeypatch.setattr(_Conditioning, "step", broken)
    with pytest.raises(NonFiniteScores, match="try MUSICBOT_DTYPE=float32"):
        tiny_engine.generate([request])
    monkeypatch.setattr(_Conditioning, "step", honest)
    assert np.array_equal(tiny_engine.generate([request])[0].tracks[0].audio, good)


@pytest.fixture(params=["float32", "bfloat16", "int8"])
def any_path_engine(request: pytest.FixtureRequest, tiny_model_dir: Path) -> MusicGenEngine:
    """The tiny model on each CPU path: exact fp32, and bf16 and int8 on our kernels where they build
    (torch's elsewhere)."""
    return load_engine(str(tiny_model_dir), device="cpu", dtype=request.param)


def test_a_track_is_the_same_whatever_it_was_batched_with(any_path_engine: MusicGenEngine) -> None:
    """The seed makes a track again: alone, it is bit for bit what it was in a batch of other prompts
    (longer and shorter, so the text is padded there) and other variations."""
    engine = any_path_engine
    long = GenerationRequest(
        "upbeat electronic dance music with heavy bass and bright synths", duration=2.0, seed=5
    )
    short = GenerationRequest("rock", duration=2.0, seed=11, variations=2)
    together = engine.generate([long, short])
    assert np.array_equal(together[0].tracks[0].audio, engine.generate([long])[0].tracks[0].audio)
    second = engine.generate([GenerationRequest("rock", duration=2.0, seed=12)])[0].tracks[0]
    assert np.array_equal(together[1].tracks[1].audio, second.audio)


def test_an_extensions_variation_is_the_same_made_alone(any_path_engine: MusicGenEngine) -> None:
    """Extensions prefill their audio through transformers: a row at a time, so variation 2 of seed 3
    is what seed 4 makes alone."""
    engine = any_path_engine
    tone = np.sin(np.linspace(0, 2000, 32000, dtype=np.float32))[None] * 0.3
    clip = AudioClip(tone, 32000)
    both = engine.generate([GenerationRequest("jazz", duration=2.0, seed=3, variations=2, continuation=clip)])
    alone = engine.generate([GenerationRequest("jazz", duration=2.0, seed=4, continuation=clip)])
    assert np.array_equal(both[0].tracks[1].audio, alone[0].tracks[0].audio)


def test_each_prompt_is_encoded_and_projected_alone(any_path_engine: MusicGenEngine) -> None:
    """What keeps a track from depending on its batch at real sizes (the tiny model's products round the
    same in any batch, the real ones' do not): the text encoder sees one unpadded prompt a call, and each
    row's text is projected for cross-attention on its own."""
    engine = any_path_engine
    seen: dict[str, list[tuple[int, ...]]] = {"text": [], "keys": []}
    hooks = [
        engine.model.text_encoder.register_forward_hook(
            lambda _m, _a, kwargs, _o: seen["text"].append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
        ),
        *(
            layer.encoder_attn.k_proj.register_forward_hook(
                lambda _m, args, _o: seen["keys"].append(tuple(args[0].shape))
            )
            for layer in engine.model.decoder.model.decoder.layers
        ),
    ]
    try:
        long = GenerationRequest("upbeat electronic dance music with heavy bass", duration=1.0, seed=1)
        engine.generate([long, GenerationRequest("rock", duration=1.0, seed=2, variations=2)])
    finally:
        for hook in hooks:
            hook.remove()
    pad = engine.tokenizer.pad_token_id
    lengths = {len(engine.tokenizer(p).input_ids) for p in ("rock", long.prompt)}
    assert sorted(seen["text"]) == sorted((1, n) for n in lengths)  # each distinct prompt once, unpadded
    assert all(shape[0] == 1 and shape[1] in lengths for shape in seen["keys"])
    assert len(seen["keys"]) == 3 * len(engine.model.decoder.model.decoder.layers)  # three rows with text
    assert pad not in engine.tokenizer("rock").input_ids


def test_the_prefill_passes_its_cache_under_the_name_the_installed_transformers_takes() -> None:
    # transformers 5.24 renamed the decoder's past_key_values to cache; 5.17 swallowed an unknown cache=
    # in **kwargs and left the prefill's cache empty (extensions, melody, long tracks' later windows failed)
    class Before:
        def forward(self, input_ids: object, past_key_values: object = None, **kwargs: object) -> None: ...

    class After:
        def forward(self, input_ids: object, cache: object = None, **kwargs: object) -> None: ...

    assert cache_keyword(Before()) == "past_key_values"
    assert cache_keyword(After()) == "cache"
