"""Request validation: every bad parameter gets its own message, nothing is half-built."""

from __future__ import annotations

import pytest

from generation import GenerationRequest, InvalidRequest, SamplingParams, check_batch


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": "   \n "}, "prompt", "empty"),
        ({"prompt": "x" * 401}, "prompt", "too long"),
        ({"prompt": "piano\x00"}, "prompt", "control characters"),
        ({"duration": 0.2}, "duration", "at least"),
        ({"variations": 0}, "variations", "between 1 and 4"),
        ({"variations": 5}, "variations", "between 1 and 4"),
        ({"seed": -1}, "seed", "seed must be"),
    ],
)
def test_invalid_request_names_its_field(kwargs: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        GenerationRequest(**{"prompt": "piano", **kwargs})
    assert err.value.field == field
    assert words in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"temperature": 0.0}, "temperature", "above 0"),
        ({"temperature": -1.0}, "temperature", "above 0"),
        ({"top_p": 1.5}, "top_p", "between 0"),
        ({"top_p": -0.1}, "top_p", "between 0"),
        ({"guidance": 0.5}, "guidance", "between 1"),
        ({"top_k": -1}, "top_k", "between 0"),
    ],
)
def test_invalid_sampling_names_its_field(kwargs: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert words in str(err.value)


def test_prompt_is_trimmed_and_seed_filled_in() -> None:
    request = GenerationRequest("  calm piano  ", variations=3)
    seeded = request.with_seed()
    assert seeded.prompt == "calm piano"
    assert seeded.seed is not None
    assert seeded.row_seeds == (seeded.seed, seeded.seed + 1, seeded.seed + 2)
    assert seeded.with_seed() is seeded


def test_batch_must_share_length_and_sampling() -> None:
    check_batch([GenerationRequest("a", duration=5), GenerationRequest("b", duration=5)])
    with pytest.raises(InvalidRequest):
        check_batch([GenerationRequest("a", duration=5), GenerationRequest("b", duration=6)])
    with pytest.raises(InvalidRequest):
        check_batch([GenerationRequest("a"), GenerationRequest("b", sampling=SamplingParams(top_k=50))])
