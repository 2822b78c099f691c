"""Our decoding step against transformers' decoder, fed the same tokens (teacher forcing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from generation import GenerationRequest
from generation.engine import cache_keyword, load_engine
from generation.fast_decoder import onednn_bf16_supported


def _logits_both_ways(
    model_dir: Path, dtype: str, steps: int = 30, requests: int = 2, kernels: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import DynamicCache, EncoderDecoderCache

    engine = load_engine(str(model_dir), device="cpu", dtype=dtype, kernels=kernels)
    prompts = ["calm lo-fi piano with rain", "rock"][:requests]
    n = len(prompts)
    torch.manual_seed(0)
    tokens = torch.randint(0, engine.model.config.decoder.vocab_size, (2 * n, engine.codebooks, steps))
    ours, theirs = [], []
    with torch.inference_mode():
        conditioning = engine._condition(prompts, GenerationRequest(prompts[0]))
        start = torch.full((n, engine.codebooks, 1), engine.pad_token)
        ours.append(conditioning.prefill(start, steps + 1))
        for t in range(steps):
            ours.append(conditioning.step(tokens[:n, :, t]))
        config = engine.model.decoder.config
        cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        column = torch.full((2 * n, engine.codebooks, 1), engine.pad_token)
        for t in range(steps + 1):
            out = engine.model.decoder(
                input_ids=column.reshape(2 * n * engine.codebooks, 1),
                encoder_hidden_states=conditioning.hidden,
                encoder_attention_mask=conditioning.mask,
                use_cache=True,
                **{cache_keyword(engine.model.decoder): cache},
            )
            theirs.append(out.logits.reshape(2 * n, engine.codebooks, -1))
            if t < steps:
                column = tokens[:, :, t : t + 1].clone()
                column[n:] = column[:n]  # the unconditional half sees the same tokens
    return torch.stack(ours).float(), torch.stack(theirs).float()


def test_fp32_step_matches_transformers_exactly(tiny_model_dir: Path) -> None:
    ours, theirs = _logits_both_ways(tiny_model_dir, "float32")
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    not onednn_bf16_supported(), reason="oneDNN's bf16 products need AVX-512 BW/VL/DQ or AVX-NE-CONVERT"
)
@pytest.mark.parametrize("requests", [1, 2])  # cross-attention: fused kernel for 2 rows, matmuls for 4
def test_bf16_packed_step_stays_close_to_transformers(tiny_model_dir: Path, requests: int) -> None:
    # torch's own kernels (where the native ones cannot be built); 80 steps: the contiguous cache
    # grows four times
    ours, theirs = _logits_both_ways(tiny_model_dir, "bfloat16", steps=80, requests=requests, kernels=False)
    assert _worst_step_error(ours, theirs) < 0.02  # bf16 rounding, not a different computation


def test_kernels_off_keeps_bf16_steps_on_torchs_kernels(tiny_model_dir: Path) -> None:
    engine = load_engine(str(tiny_model_dir), device="cpu", dtype="bfloat16", kernels=False)
    [result] = engine.generate([GenerationRequest("piano", duration=1.0, seed=1)])
    assert result.tracks[0].samples == 32000
    assert engine._fast_weights().linear.kind in ("onednn", "plain")


@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_stereo_dir"])
@pytest.mark.parametrize("requests", [1, 2])
def test_bf16_native_step_stays_close_to_transformers(
    model: str, requests: int, request: pytest.FixtureRequest
) -> None:
    from generation import native

    if native.load() is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    directory = request.getfixturevalue(model)  # stereo: 8 codebooks' embeddings and LM heads
    ours, theirs = _logits_both_ways(directory, "bfloat16", steps=80, requests=requests)
    assert _worst_step_error(ours, theirs) < 0.02


@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_stereo_dir"])
def test_bf16_weights_pack_in_one_buffer_as_each_stacked_matrix_would(
    model: str, request: pytest.FixtureRequest
) -> None:
    from generation import native
    from generation.fast_decoder import _Matrices

    kernels = native.load()
    if kernels is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    engine = load_engine(str(request.getfixturevalue(model)), device="cpu", dtype="bfloat16")
    weights = engine._fast_weights()
    assert weights.linear.kind == "native"
    decoder = engine.model.decoder
    matrices = _Matrices(decoder.lm_heads, decoder.model.decoder.layers, weights.scale)
    packed = {"lm_head": weights.lm_head}
    for index, layer in enumerate(weights.layers):
        for kind in ("qkv", "out", "cross_q", "cross_out", "fc1", "fc2"):
            packed[f"{index}.{kind}"] = getattr(layer, kind)
    assert sorted(packed) == sorted(matrices.names)
    # the parts packed one after the other (Q, K, V; each codebook's head) equal the stack packed whole
    for name in matrices.names:
        assert torch.equal(packed[name], kernels.pack(matrices.matrix(name))), name
    storage = {t.untyped_storage().data_ptr() for t in packed.values()}
    assert len(storage) == 1  # one buffer for every matrix


@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_stereo_dir"])
@pytest.mark.parametrize("kernels", [True, False])  # our int8 kernels where the CPU runs them; fbgemm's
def test_int8_step_stays_close_to_fp32(model: str, kernels: bool, request: pytest.FixtureRequest) -> None:
    from generation.loader import int8_supported

    if not int8_supported():
        pytest.skip("fbgemm is needed for int8 steps")
    directory = request.getfixturevalue(model)
    ours, _ = _logits_both_ways(directory, "int8", steps=80, kernels=kernels)
    reference, _ = _logits_both_ways(directory, "float32", steps=80)
    assert _worst_step_error(ours, reference) < 0.05


def test_int8_steps_run_on_our_kernels_where_the_cpu_has_vnni(tiny_model_dir: Path) -> None:
    from generation import native
    from generation.loader import int8_supported

    if not int8_supported():
        pytest.skip("fbgemm is needed for int8 steps")
    weights = load_engine(str(tiny_model_dir), device="cpu", dtype="int8")._fast_weights()
    kernels = native.load()
    ours = kernels is not None and kernels.int8
    assert weights.linear.kind == ("native-int8" if ours else "int8")
    if ours:  # and the whole step is one native call over the packed int8 matrices
        assert weights.lm_head.dtype == torch.int8
        off = load_engine(str(tiny_model_dir), device="cpu", dtype="int8", kernels=False)._fast_weights()
        assert off.linear.kind == "int8"


def _two_prompts_prefilled(model_dir: Path, dtype: str) -> tuple[Any, list[int]]:
    """A native pass over a long prompt and a short one, prefilled: its decoding state, and each prompt's
    token count."""
    engine = load_engine(str(model_dir), device="cpu", dtype=dtype)
    prompts = ["calm lo-fi piano with rain", "rock"]
    with torch.inference_mode():
        conditioning = engine._condition(prompts, GenerationRequest(prompts[0]))
        conditioning.prefill(torch.full((2, engine.codebooks, 1), engine.pad_token), 8)
    return conditioning.state, [len(engine.tokenizer(p).input_ids) for p in prompts]


def test_int8_steps_read_the_text_as_int8_caches_each_row_over_its_prompt(tiny_model_dir: Path) -> None:
    from generation import native

    kernels = native.load()
    if kernels is None or not kernels.int8:
        pytest.skip("our int8 kernels need VNNI (or AVX2)")
    state, lengths = _two_prompts_prefilled(tiny_model_dir, "int8")
    assert state.cross_rows == 2 and state.cross_lengths is not None
    assert state.cross_lengths.tolist() == lengths
    keys, values = state.cross_int8[0]
    assert keys.dtype == values.dtype == torch.int8
    assert keys.shape[1] % 4 == 0 and keys.shape[1] >= max(lengths)  # whole quads
    assert state.native_step is not None and state.native_step.model.cross_lengths
    assert not state.native_step.model.cross_mask  # the lengths stand for the mask


def test_bf16_steps_read_each_rows_prompt_by_its_length(tiny_model_dir: Path) -> None:
    from generation import native

    if native.load() is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    state, lengths = _two_prompts_prefilled(tiny_model_dir, "bfloat16")
    assert state.cross_lengths is not None
    assert state.cross_lengths.tolist() == lengths
    assert state.cross[0][0].dtype == torch.bfloat16 and not state.cross_int8
    assert state.cross_mask is not None  # kept for Python's steps
    assert state.native_step is not None and state.native_step.model.cross_lengths
    assert not state.native_step.model.cross_mask


def test_prompt_lengths_read_a_padding_mask_and_nothing_else() -> None:
    from generation.fast_decoder import prompt_lengths

    hidden = torch.finfo(torch.bfloat16).min
    mask = torch.zeros(3, 5)
    mask[1, 2:], mask[2, 4:] = hidden, hidden
    assert prompt_lengths(mask, 3, 5).tolist() == [5, 2, 4]
    assert prompt_lengths(None, 2, 5).tolist() == [5, 5]
    hole = torch.zeros(1, 5)
    hole[0, 1] = hidden  # not a prefix: a hole in the prompt
    nothing = torch.full((1, 5), hidden)  # a row that sees nothing: softmax over all of it
    soft = torch.zeros(1, 5)
    soft[0, 3:] = -10.0  # a mask that only lowers scores, which still weigh something
    for other in (hole, nothing, soft):
        assert prompt_lengths(other, 1, 5) is None


def _worst_step_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest relative error of any one step's logits (a wrong cache shows up after its step)."""
    steps = ours.shape[0]
    errors = (ours - reference).reshape(steps, -1).norm(dim=1) / reference.reshape(steps, -1).norm(dim=1)
    return float(errors.max())


def test_int8_engine_makes_exact_lengths(tiny_model_dir: Path) -> None:
    engine = load_engine(str(tiny_model_dir), device="cpu", dtype="int8")
    assert engine.info.dtype.startswith("int8")
    [result] = engine.generate([GenerationRequest("piano", duration=2.5, seed=1, variations=2)])
    assert [t.samples for t in result.tracks] == [80000, 80000]


def test_contiguous_cache_attends_exactly_like_the_preallocated_one() -> None:
    from generation.fast_decoder import _ContiguousAttention, _PlainAttention

    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=generator)

    layers, rows, heads, dim = 2, 2, 4, 8
    prefix = [(randn(rows, heads, 3, dim), randn(rows, heads, 3, dim)) for _ in range(layers)]
    plain = _PlainAttention(prefix, 100, 1.0, torch.float32)
    contiguous = _ContiguousAttention(prefix, torch.float32)
    for _ in range(90):  # the cache grows five times
        for layer in range(layers):
            # peaked attention: a key or value in the wrong place changes the result
            q = randn(rows, heads, dim, scale=3.0)
            k, v = randn(rows, heads, dim), randn(rows, heads, dim)
            qkv = torch.stack([q, k, v], 1).reshape(rows, 1, 3 * heads * dim)
            expected = plain(layer, qkv).reshape(rows, -1)
            got = contiguous(layer, qkv).reshape(rows, -1)
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
        plain.advance()
        contiguous.advance()


@pytest.mark.parametrize(("guidance", "cross_rows"), [(3.0, 2), (1.0, 2)])
def test_only_conditioned_rows_take_part_in_cross_attention(
    tiny_model_dir: Path, guidance: float, cross_rows: int
) -> None:
    # with guidance the two unconditional rows (last) attend over zeros and are skipped; the fp32 test
    # above holds the skipping to transformers' logits for those rows
    from generation.request import SamplingParams

    engine = load_engine(str(tiny_model_dir), device="cpu", dtype="float32")
    prompts = ["calm lo-fi piano with rain", "rock"]
    request = GenerationRequest(prompts[0], sampling=SamplingParams(guidance=guidance))
    with torch.inference_mode():
        conditioning = engine._condition(prompts, request)
        conditioning.prefill(torch.full((2, engine.codebooks, 1), engine.pad_token), 4)
    assert conditioning.state is not None
    assert conditioning.state.rows == (4 if guidance > 1 else 2)
    assert conditioning.state.cross_rows == cross_rows


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_one_native_call_a_step_gives_the_python_loops_logits(tiny_model_dir: Path, guidance: float) -> None:
    # the whole step as one native call, against the same kernels called layer by layer from Python:
    # the same operations in the same order and precision; only the layer norms' fp32 sums are ordered
    # otherwise than torch's, which moves about one bf16 output in 100,000 by one unit
    from generation import native
    from generation.request import SamplingParams

    if native.load() is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    engine = load_engine(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    prompts = ["calm lo-fi piano with rain", "rock"]
    request = GenerationRequest(prompts[0], sampling=SamplingParams(guidance=guidance))
    torch.manual_seed(1)
    tokens = torch.randint(0, engine.model.config.decoder.vocab_size, (2, engine.codebooks, 40))
    runs = []
    for fused in (True, False):
        with torch.inference_mode():
            conditioning = engine._condition(prompts, request)
            conditioning.prefill(torch.full((2, engine.codebooks, 1), engine.pad_token), 41)
            state = conditioning.state
            assert state is not None and (state.native_step is not None) == (state.w.linear.kind == "native")
            assert state.native_step is not None
            if not fused:
                state.native_step = None
            runs.append(torch.stack([conditioning.step(tokens[..., t]) for t in range(40)]).float())
    fused_logits, loop_logits = runs
    assert _worst_step_error(fused_logits, loop_logits) < 1e-3


def _one_native_pass(tiny_model_dir: Path) -> tuple[Any, int]:
    """A bf16 pass of one request on the native kernels, prefilled (skips where they cannot be built);
    returns its conditioning and the model's codebooks."""
    from generation import native

    if native.load() is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    engine = load_engine(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    with torch.inference_mode():
        conditioning = engine._condition(["rock"], GenerationRequest("rock"))
        conditioning.prefill(torch.full((1, engine.codebooks, 1), engine.pad_token), 4)
    return conditioning, engine.codebooks


def test_the_native_step_refuses_tokens_outside_the_embeddings(tiny_model_dir: Path) -> None:
    conditioning, codebooks = _one_native_pass(tiny_model_dir)
    tables = conditioning.state.w.embeddings[0].shape[0]
    with torch.inference_mode():
        for bad in (tables, -1):
            with pytest.raises(ValueError, match="tokens"):
                conditioning.step(torch.full((1, codebooks), bad))


def test_the_native_step_refuses_more_cross_attention_rows_than_it_has(tiny_model_dir: Path) -> None:
    state = _one_native_pass(tiny_model_dir)[0].state
    state.cross_rows = state.rows + 1  # the step would read and write past its rows
    with pytest.raises(ValueError, match="cross_rows"):
        state._native_step()
