"""Every call the engine makes into the native kernels passes the declared interface's checks.

This runs on any x86-64 with g++. Where the CPU has the instructions, the real kernels run. Where it
lacks them, a library built for an AVX-512 BF16 CPU is loaded and each entry point that computes is
replaced by a stub that counts its calls. The checks at the boundary still run for every real call of a
decoding pass and an EnCodec decode, mono and stereo, with and without AMX, and nothing crosses into
code this CPU cannot run.
"""

from __future__ import annotations

import ctypes
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from generation import GenerationRequest, native
from generation.codec import EncodecDecoder
from generation.engine import load_engine
from generation.loader import cpu_flags

RUNS_HERE = all(f in cpu_flags() for f in native.REQUIRED_CPU)
HAS_GXX = shutil.which("g++") is not None and cpu_flags() != frozenset()


class _Stub:
    def __init__(self, name: str, calls: Counter[str]) -> None:
        self.name, self.calls = name, calls

    def __call__(self, *args: Any) -> None:
        self.calls[self.name] += 1


@pytest.fixture(scope="module")
def stubbed(tmp_path_factory: pytest.TempPathFactory) -> tuple[native.NativeKernels, Counter[str]]:
    if not HAS_GXX:
        pytest.skip("no g++ for x86-64 here")
    target = tmp_path_factory.mktemp("kernels") / "kernels.so"
    flags = [f for f in native.FLAGS if f != "-march=native"]
    native.compile_library("g++", (*flags, "-march=sapphirerapids"), target)
    kernels = native.NativeKernels(ctypes.CDLL(str(target)), target)
    calls: Counter[str] = Counter()
    for name, bound in kernels.calls.items():
        if bound.kernel.returns == "void":  # the ones that compute; sizes are plain integer arithmetic
            bound._function = _Stub(name, calls)
    return kernels, calls


@pytest.fixture(params=[False, True], ids=["avx512", "amx"])
def kernels(
    request: pytest.FixtureRequest,
    stubbed: tuple[native.NativeKernels, Counter[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[native.NativeKernels, Counter[str]]]:
    built, calls = stubbed
    monkeypatch.setattr(built, "amx", request.param)
    monkeypatch.setattr(built, "int8", True)  # every AVX-512 BF16 CPU has VNNI
    monkeypatch.setattr(built, "amx_int8", request.param)
    monkeypatch.setattr(native, "load", lambda: built)
    calls.clear()
    yield built, calls


@pytest.mark.skipif(RUNS_HERE, reason="the real kernels run here (test_native.py)")
@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_stereo_dir"])
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_decoding_pass_and_a_decode_make_only_calls_the_interface_accepts(
    kernels: tuple[native.NativeKernels, Counter[str]], model: str, dtype: str, request: pytest.FixtureRequest
) -> None:
    built, calls = kernels
    directory: Path = request.getfixturevalue(model)
    engine = load_engine(str(directory), device="cpu", dtype=dtype, kernels=True)
    prompts = ["calm lo-fi piano with rain", "rock"]
    with torch.inference_mode():
        conditioning = engine._condition(prompts, GenerationRequest(prompts[0]))
        assert engine._fast_weights().linear.kind == ("native-int8" if dtype == "int8" else "native")
        conditioning.prefill(torch.full((2, engine.codebooks, 1), engine.pad_token), 12)
        assert conditioning.state is not None and conditioning.state.native_step is not None
        for _ in range(10):
            conditioning.step(torch.zeros((2, engine.codebooks), dtype=torch.long))
        decoder = EncodecDecoder(engine.model.audio_encoder, torch.device("cpu"), kernels=True)
        decoder(torch.zeros((2 * engine.channels, engine.channel_codebooks, 60), dtype=torch.long))
    assert calls["decoder_step"] == 11  # the start column (the text-only prefill, at position 0) and ten
    assert calls["pack_linear_int8" if dtype == "int8" else "pack_linear_weight"] > 0
    encodec = {"resblock_f32", "resblock_amx", "upsample_f32", "upsample_amx", "narrow_conv_f32"}
    assert encodec & set(calls), f"no EnCodec kernel was called: {dict(calls)}"
    if built.amx:
        assert calls["pack_amx_conv"] > 0
