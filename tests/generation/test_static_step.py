"""The device-side decoding step (static KV cache, sampling and delay pattern on the device), on the CPU.

On CUDA the same step is captured as a CUDA graph; the tests marked for CUDA run only where one is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from generation import GenerationRequest
from generation.engine import MusicGenEngine, load_engine
from generation.static_step import StaticSteps, bucket
from tests.generation.codes import codes_from_generate, our_codes

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _on_static_steps(engine: MusicGenEngine) -> Iterator[MusicGenEngine]:
    """The shared session engine on device steps for one test, back on its own steps after it."""
    engine.static_steps = True
    try:
        yield engine
    finally:
        engine.static_steps = False
        engine.close_steps()


@pytest.fixture
def static_engine(tiny_engine: MusicGenEngine) -> Iterator[MusicGenEngine]:
    yield from _on_static_steps(tiny_engine)


@pytest.fixture
def static_stereo(tiny_stereo_engine: MusicGenEngine) -> Iterator[MusicGenEngine]:
    yield from _on_static_steps(tiny_stereo_engine)


def test_buffers_come_in_powers_of_two() -> None:
    assert [bucket(n, 256) for n in (1, 256, 257, 1500, 2048)] == [256, 256, 512, 2048, 2048]


# --- the static step against transformers ---


@pytest.mark.parametrize("engine_name", ["static_engine", "static_stereo"])
def test_static_greedy_codes_match_transformers_generate(
    engine_name: str, request: pytest.FixtureRequest
) -> None:
    engine = request.getfixturevalue(engine_name)
    prompts = ["calm lo-fi piano with rain", "rock"]
    expected = codes_from_generate(engine, prompts, 40)
    assert torch.equal(our_codes(engine, prompts, 40), expected)


def test_static_audio_prompted_greedy_codes_match_transformers_generate(
    static_engine: MusicGenEngine,
) -> None:
    prompts = ["jazz trio", "hip hop beat with vinyl crackle"]
    audio = (np.random.default_rng(0).standard_normal((2, 1, 32000)) * 0.1).astype(np.float32)
    expected = codes_from_generate(
        static_engine,
        prompts,
        30,
        input_values=torch.from_numpy(audio),
        padding_mask=torch.ones(2, 32000, dtype=torch.long),
    )
    assert torch.equal(our_codes(static_engine, prompts, 30, audio), expected)


def test_static_melody_codes_match_the_step_by_step_path(tiny_melody_dir: Path) -> None:
    engine = load_engine(str(tiny_melody_dir), name="melody", device="cpu", dtype="float32")
    prompts = ["folk song", "slow"]
    expected = our_codes(engine, prompts, 30)
    engine.static_steps = True
    assert torch.equal(our_codes(engine, prompts, 30), expected)


# --- the engine on static steps ---


def test_static_steps_make_exact_lengths_and_repeat_a_seed(static_stereo: MusicGenEngine) -> None:
    request = GenerationRequest("piano", duration=2.5, seed=4, variations=2)
    [a] = static_stereo.generate([request])
    [b] = static_stereo.generate([request])
    assert [t.audio.shape for t in a.tracks] == [(2, 80000)] * 2
    assert np.array_equal(a.tracks[0].audio, b.tracks[0].audio)
    assert not np.array_equal(a.tracks[0].audio, a.tracks[1].audio)


def test_a_static_row_is_the_same_alone_and_in_a_batch(static_engine: MusicGenEngine) -> None:
    short = GenerationRequest("piano", duration=1, seed=3)
    long = GenerationRequest("epic orchestral soundtrack, strings and brass, cinematic", duration=1, seed=4)
    [alone] = static_engine.generate([short])
    batch = static_engine.generate([short, long])
    np.testing.assert_allclose(batch[0].tracks[0].audio, alone.tracks[0].audio, atol=1e-5)


def test_static_long_tracks_and_cancel(static_engine: MusicGenEngine) -> None:
    [long] = static_engine.generate([GenerationRequest("ambient", duration=35, seed=1)])
    assert long.tracks[0].samples == 35 * 32000
    cancel = threading.Event()

    def on_step(done: int, total: int) -> None:
        if done == 60:
            cancel.set()

    [cut] = static_engine.generate(
        [GenerationRequest("drums", duration=7, seed=2)], progress=on_step, cancel=cancel
    )
    assert cut.cancelled and 0 < cut.tracks[0].samples < 7 * 32000


def test_buffers_are_kept_for_a_few_batch_shapes_and_reused(static_engine: MusicGenEngine) -> None:
    for seed in (1, 2):
        static_engine.generate([GenerationRequest("piano", duration=1, seed=seed)])
    assert len(static_engine._static) == 1
    first = next(iter(static_engine._static.values()))
    for variations in (2, 3, 4, 1):
        static_engine.generate([GenerationRequest("piano", duration=1, seed=1, variations=variations)])
    assert len(static_engine._static) == 4  # at most KEPT_STATIC_SHAPES
    assert isinstance(first, StaticSteps) and first in static_engine._static.values()


class _Drifting:
    """A stepper that runs the step and then drifts from it, as a broken graph would."""

    def __init__(self, steps: StaticSteps) -> None:
        self.steps = steps

    def step(self) -> None:
        self.steps.step()
        self.steps.logits += 0.5


def test_a_graph_that_differs_from_the_eager_step_is_turned_off_with_a_log_line(
    static_engine: MusicGenEngine, caplog: pytest.LogCaptureFixture
) -> None:
    static_engine.graphs = True
    with caplog.at_level(logging.WARNING, logger="generation.engine"):
        assert static_engine.check_graphs(_Drifting) is False
    assert not static_engine.graphs
    assert "CUDA graphs off for tiny: the captured step differs from the eager one" in caplog.text
    [result] = static_engine.generate([GenerationRequest("piano", duration=1, seed=1)])
    assert result.tracks[0].samples == 32000  # the eager device step still serves


def test_a_faithful_stepper_passes_the_check(static_engine: MusicGenEngine) -> None:
    assert static_engine.check_graphs(lambda steps: steps) is True


# --- on a CUDA GPU ---


@cuda
def test_the_cuda_graph_agrees_and_no_step_waits_for_the_host(tiny_stereo_dir: Path) -> None:
    engine = load_engine(str(tiny_stereo_dir), name="tiny-stereo", device="cuda", dtype="float32")
    assert engine.static_steps and engine.graphs  # the check at load passed
    engine.generate([GenerationRequest("piano", duration=1, seed=1)])  # capture outside the check
    [steps] = engine._static.values()
    graph = engine._graphs[steps.key()]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            graph.step()
            steps.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_cuda_graph_generation_makes_stereo_of_exact_length(tiny_stereo_dir: Path) -> None:
    engine = load_engine(str(tiny_stereo_dir), name="tiny-stereo", device="cuda", dtype="bfloat16")
    [result] = engine.generate([GenerationRequest("piano", duration=2.5, seed=1, variations=2)])
    assert [t.audio.shape for t in result.tracks] == [(2, 80000)] * 2
