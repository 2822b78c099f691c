"""Codes from transformers' ``generate`` and from our decoding loop, for the same greedy request."""

from __future__ import annotations

import numpy as np
import torch

from generation import GenerationRequest, SamplingParams
from generation.engine import MusicGenEngine

GREEDY = SamplingParams(top_k=1)


def codes_from_generate(
    engine: MusicGenEngine, prompts: list[str], frames: int, **inputs: torch.Tensor
) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    model = engine.model
    decode = model.audio_encoder.decode

    def spy(codes: torch.Tensor, *args: object, **kwargs: object) -> object:
        captured.append(codes[0].clone())
        return decode(codes, *args, **kwargs)

    model.audio_encoder.decode = spy
    try:
        tokens = engine.tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            model.generate(
                **tokens,
                **inputs,
                max_new_tokens=frames + engine.channel_codebooks - 1,
                do_sample=False,
                guidance_scale=3.0,
            )
    finally:
        del model.audio_encoder.decode
    if len(captured) == 1:
        return captured[0]
    # Stereo: ``generate`` decodes the left codebooks (``::2``), then the right ones (``1::2``).
    left, right = captured
    return torch.stack([left, right], dim=2).reshape(left.shape[0], -1, left.shape[-1])


def our_codes(
    engine: MusicGenEngine, prompts: list[str], frames: int, audio: np.ndarray | None = None
) -> torch.Tensor:
    request = GenerationRequest(prompts[0], sampling=GREEDY)
    with torch.inference_mode():
        conditioning = engine._condition(prompts, request)
        prompt_codes = engine._encode(audio) if audio is not None else None
        codes, cancelled = engine._decode(
            conditioning,
            prompt_codes,
            frames,
            GREEDY,
            [torch.Generator() for _ in prompts],
            lambda: None,
            None,
        )
    assert not cancelled
    return codes
