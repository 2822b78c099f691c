"""Next-token choice: the distribution each setting promises, drawn from seeded generators."""

from __future__ import annotations

import pytest
import torch

from generation import SamplingParams
from generation.sampling import choose

DRAWS = 4000


def _frequencies(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """How often each token of ``scores (vocab,)`` is drawn, over DRAWS draws from one generator."""
    generator = torch.Generator().manual_seed(0)
    rows = scores.expand(1, DRAWS, -1)  # one row, DRAWS codebooks: DRAWS independent draws
    tokens = choose(rows, params, [generator])
    return torch.bincount(tokens.flatten(), minlength=scores.shape[-1]).float() / DRAWS


def _masked_softmax(scores: torch.Tensor, keep: list[int]) -> torch.Tensor:
    masked = torch.full_like(scores, float("-inf"))
    masked[keep] = scores[keep]
    return masked.softmax(-1)


def test_top_k_draws_the_k_best_in_their_softmax_proportions() -> None:
    scores = torch.tensor([0.5, 2.0, -1.0, 1.5, 3.0, 0.0, 1.0, -2.0])
    freq = _frequencies(scores, SamplingParams(top_k=3, guidance=1.0))
    expected = _masked_softmax(scores, [4, 1, 3])
    assert freq[[0, 2, 5, 6, 7]].sum() == 0  # nothing outside the top 3
    assert torch.allclose(freq, expected, atol=0.03)


def test_scores_tied_with_the_kth_are_all_kept() -> None:
    # top_k=2, but tokens 1, 2 and 3 tie for second place: transformers keeps all three
    scores = torch.tensor([3.0, 1.0, 1.0, 1.0, -5.0, 0.0])
    freq = _frequencies(scores, SamplingParams(top_k=2, guidance=1.0))
    expected = _masked_softmax(scores, [0, 1, 2, 3])
    assert (freq[[1, 2, 3]] > 0).all()
    assert freq[[4, 5]].sum() == 0
    assert torch.allclose(freq, expected, atol=0.03)


def test_top_p_after_top_k_keeps_the_fewest_that_reach_p() -> None:
    # probabilities over the top 4 (of 6): about 0.64, 0.24, 0.09, 0.03; top_p 0.8 keeps the first two
    scores = torch.tensor([-4.0, 2.0, 0.0, 3.0, 1.0, -3.0])
    freq = _frequencies(scores, SamplingParams(top_k=4, top_p=0.8, guidance=1.0))
    expected = _masked_softmax(scores, [3, 1])
    assert freq[[0, 2, 4, 5]].sum() == 0
    assert torch.allclose(freq, expected, atol=0.03)


def test_temperature_flattens_the_distribution() -> None:
    scores = torch.tensor([2.0, 1.0, 0.0, -1.0])
    freq = _frequencies(scores, SamplingParams(top_k=0, temperature=2.0, guidance=1.0))
    assert torch.allclose(freq, (scores / 2.0).softmax(-1), atol=0.03)


def test_ties_in_one_codebook_leave_the_others_to_their_top_k() -> None:
    # codebook 0 ties three ways at its 2nd place (so each codebook keeps 4 candidates); codebook 1 has
    # no ties and must still draw from its top 2 alone
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, -5.0, 0.0], [0.0, 2.0, 1.0, 3.0, -1.0, 0.5]])
    generator = torch.Generator().manual_seed(0)
    tokens = choose(
        scores.expand(1, DRAWS, 2, 6).reshape(1, DRAWS * 2, 6), SamplingParams(top_k=2), [generator]
    )
    second = torch.bincount(tokens.view(DRAWS, 2)[:, 1], minlength=6).float() / DRAWS
    assert torch.allclose(second, _masked_softmax(scores[1], [3, 1]), atol=0.03)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 logits tie often
def test_a_rows_draw_depends_on_its_seed_alone(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    scores = (torch.randn(3, 4, 2048, generator=g) * 3).to(dtype).float()
    scores[2, 1, :300] = 50.0  # another row: 300 scores tied for the best, past top_k
    params = SamplingParams()  # top_k 250, as the bot uses

    def seeded(*seeds: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in seeds]

    for seed in range(20):
        together = choose(scores, params, seeded(seed, seed + 1, seed + 2))
        assert torch.equal(together[:1], choose(scores[:1], params, seeded(seed)))
        assert torch.equal(together[1:2], choose(scores[1:2], params, seeded(seed + 1)))
        assert torch.equal(choose(scores, params, seeded(seed, seed + 1, seed + 2)), together)  # and repeats
