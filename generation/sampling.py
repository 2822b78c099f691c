"""Next-token choice: classifier-free guidance, temperature, top-k, top-p, and an inverse-CDF draw from
uniform numbers each row draws from its own generator for the whole pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from generation.errors import NonFiniteScores
from generation.request import SamplingParams

if TYPE_CHECKING:
    from generation.native import NativeKernels


def guide(logits: torch.Tensor, batch: int, guidance: float) -> torch.Tensor:
    """Combine the conditional first half of a doubled batch with its unconditional second half."""
    if guidance <= 1.0:
        return logits[:batch]
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + (cond - uncond) * guidance


def pass_uniforms(generators: list[torch.Generator], length: int, codebooks: int) -> torch.Tensor:
    """``(length, rows, codebooks)`` uniform numbers in [0, 1) for a pass's columns, each row's from its
    own generator: a row's music depends on its seed alone, never on the rest of the batch."""
    return torch.stack(
        [torch.rand((length, codebooks), generator=g, device=g.device) for g in generators], dim=1
    )


def choose(scores: torch.Tensor, params: SamplingParams, draws: torch.Tensor) -> torch.Tensor:
    """The next token per codebook: ``scores (rows, codebooks, vocab)`` → ``(rows, codebooks)``.

    Temperature, then top-k (ties with the k-th kept, as transformers keeps them; bf16 logits often
    tie), then top-p (transformers' order), then the first token whose cumulative probability, in
    vocabulary order, reaches ``draws (rows, codebooks)`` (uniform in [0, 1)) times the total: an
    inverse-CDF draw, with fixed shapes and no host synchronisation, so the GPU's captured step runs it
    too. A row's token depends on its own scores and numbers alone.
    """
    if params.top_k == 1:
        return scores.argmax(dim=-1)
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0.0 < params.top_p < 1.0:
        scores = top_p(scores, params.top_p)
    cdf = scores.float().softmax(dim=-1).cumsum(dim=-1)
    # At least the smallest normal number: a draw of 0 takes the first token kept, not one before it that
    # has nothing; at most the total, which the cumulative sum always reaches.
    target = (draws[..., None] * cdf[..., -1:]).clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.searchsorted(cdf, target)[..., 0].clamp_(max=scores.shape[-1] - 1)


def next_tokens(
    logits: torch.Tensor,
    batch: int,
    params: SamplingParams,
    draws: torch.Tensor,
    kernels: NativeKernels | None = None,
) -> torch.Tensor:
    """A CPU step's tokens from its logits (the batch's rows, then with guidance its unconditional ones):
    ``guide`` and ``choose`` in one native call where our kernels run (bf16 logits, no top-p), the same
    choice from the same numbers. Scores holding NaN or +infinity (or nothing but -infinity) raise
    ``NonFiniteScores``."""
    simple = params.top_k != 1 and not 0.0 < params.top_p < 1.0
    if kernels is not None and simple and logits.dtype == torch.bfloat16:
        return kernels.sample(
            logits.contiguous(),
            draws.contiguous(),
            guided=params.guidance > 1.0,
            guidance=params.guidance,
            temperature=params.temperature,
            top_k=params.top_k,
        )
    scores = guide(logits.float(), batch, params.guidance)
    # NaN or +inf anywhere, or nothing but -inf (-inf alone is a token of probability 0)
    refused = (scores.isnan() | (scores == float("inf"))).any(dim=-1) | (scores == float("-inf")).all(dim=-1)
    broken = int(refused.sum())
    if broken:
        raise NonFiniteScores(broken)
    return choose(scores, params, draws)


def top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the fewest most likely tokens whose probabilities sum to at least ``p`` (-inf for the rest)."""
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1] = False  # always keep the most likely token
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
