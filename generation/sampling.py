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


def choose(scores: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """The next token per codebook: ``scores (rows, codebooks, vocab)`` → ``(rows, codebooks)``.

    Temperature, then top-k, then top-p (transformers' order), then one draw per row from its own
    generator. A row's token depends on its own scores and seed alone, never on the rest of the batch.

    With top-k a row draws among its k best alone (and any tied with the k-th, which transformers keeps
    too; bf16 logits often tie): the same distribution as over the whole masked vocabulary, whose other
    tokens have probability 0, with a tenth of the random numbers.
    """
    if params.top_k == 1:
        return scores.argmax(dim=-1)
    if params.temperature != 1.0:
        scores = scores / params.temperature
    k = params.top_k if 0 < params.top_k < scores.shape[-1] else 0
    if k:
        values, candidates = torch.topk(scores, k, dim=-1)  # each (row, codebook) on its own
        kth = values[..., -1:]
        kept = (scores >= kth).sum(dim=-1).amax(dim=-1).tolist()
    tokens = []
    for row, generator in enumerate(generators):
        if not k:
            row_scores, row_candidates = scores[row], None
        elif kept[row] > k:  # ties with a codebook's k-th score: keep them all
            row_scores, row_candidates = torch.topk(scores[row], kept[row], dim=-1)
            row_scores = row_scores.masked_fill(row_scores < kth[row], float("-inf"))
        else:
            row_scores, row_candidates = values[row], candidates[row]
        if 0.0 < params.top_p < 1.0:
            row_scores = top_p(row_scores, params.top_p)
        drawn = torch.multinomial(row_scores.float().softmax(dim=-1), 1, generator=generator)
        tokens.append(drawn[:, 0] if row_candidates is None else row_candidates.gather(-1, drawn)[:, 0])
    return torch.stack(tokens)


def top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the fewest most likely tokens whose probabilities sum to at least ``p`` (-inf for the rest)."""
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1] = False  # always keep the most likely token
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
