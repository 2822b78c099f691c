"""Next-token choice: classifier-free guidance, temperature, top-k, top-p, one RNG per row."""

from __future__ import annotations

import torch

from generation.request import SamplingParams


def guide(logits: torch.Tensor, batch: int, guidance: float) -> torch.Tensor:
    """Combine the conditional first half of a doubled batch with its unconditional second half."""
    if guidance <= 1.0:
        return logits[:batch]
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + (cond - uncond) * guidance


def warp(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (transformers' order), on ``(..., vocab)`` float scores."""
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0.0 < params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - params.top_p)
        remove[..., -1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scores


def sample(scores: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Draw one token per codebook: ``scores (rows, codebooks, vocab)`` → ``(rows, codebooks)``.

    Each row draws from its own generator, so a row's result depends on its seed alone, not on what
    else shares the batch.
    """
    probs = scores.float().softmax(dim=-1)
    return torch.stack(
        [torch.multinomial(probs[row], 1, generator=gen).squeeze(-1) for row, gen in enumerate(generators)]
    )
