"""Next-token choice: the distribution each setting promises, drawn from each row's own numbers; the same
choice in torch (``choose``, which the GPU's captured step runs too) and in one native call."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from generation import SamplingParams, native
from generation.errors import NonFiniteScores
from generation.sampling import choose, next_tokens, pass_uniforms

DRAWS = 4000
Pick = Callable[[torch.Tensor, SamplingParams, torch.Tensor], torch.Tensor]


@pytest.fixture
def kernels() -> native.NativeKernels:
    """The native kernels for this CPU (skipped where they cannot be had)."""
    loaded = native.load()
    if loaded is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    return loaded


@pytest.fixture(params=["torch", "native"])
def pick(request: pytest.FixtureRequest) -> Pick:
    """A step's choice from unguided scores ``(rows, codebooks, vocab)`` and draws ``(rows, codebooks)``:
    torch's, or the native kernel's (on the scores as the bf16 logits it takes)."""
    if request.param == "torch":
        return lambda scores, params, draws: next_tokens(scores, scores.shape[0], params, draws)
    kernels = request.getfixturevalue("kernels")
    return lambda scores, params, draws: next_tokens(
        scores.to(torch.bfloat16), scores.shape[0], params, draws, kernels
    )


def _frequencies(pick: Pick, scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """How often each token of ``scores (vocab,)`` is drawn, over DRAWS draws."""
    draws = torch.rand(1, DRAWS, generator=torch.Generator().manual_seed(0))
    tokens = pick(scores.expand(1, DRAWS, -1), params, draws)  # one row, DRAWS codebooks
    return torch.bincount(tokens.flatten(), minlength=scores.shape[-1]).float() / DRAWS


def _masked_softmax(scores: torch.Tensor, keep: list[int]) -> torch.Tensor:
    masked = torch.full_like(scores, float("-inf"))
    masked[keep] = scores[keep]
    return masked.softmax(-1)


UNGUIDED = SamplingParams(guidance=1.0)


def test_top_k_draws_the_k_best_in_their_softmax_proportions(pick: Pick) -> None:
    scores = torch.tensor([0.5, 2.0, -1.0, 1.5, 3.0, 0.0, 1.0, -2.0])
    freq = _frequencies(pick, scores, SamplingParams(top_k=3, guidance=1.0))
    expected = _masked_softmax(scores, [4, 1, 3])
    assert freq[[0, 2, 5, 6, 7]].sum() == 0  # nothing outside the top 3
    assert torch.allclose(freq, expected, atol=0.03)


def test_a_draw_follows_the_distribution_and_never_takes_a_token_of_probability_zero(pick: Pick) -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    freq = _frequencies(pick, probs.log(), SamplingParams(top_k=0, guidance=1.0))
    assert torch.allclose(freq, probs, atol=0.02)
    assert freq[4] == 0


def test_scores_tied_with_the_kth_are_all_kept(pick: Pick) -> None:
    # top_k=2, but tokens 1, 2 and 3 tie for second place: transformers keeps all three
    scores = torch.tensor([3.0, 1.0, 1.0, 1.0, -5.0, 0.0])
    freq = _frequencies(pick, scores, SamplingParams(top_k=2, guidance=1.0))
    expected = _masked_softmax(scores, [0, 1, 2, 3])
    assert (freq[[1, 2, 3]] > 0).all()
    assert freq[[4, 5]].sum() == 0
    assert torch.allclose(freq, expected, atol=0.03)


def test_top_p_after_top_k_keeps_the_fewest_that_reach_p(pick: Pick) -> None:
    # probabilities over the top 4 (of 6): about 0.64, 0.24, 0.09, 0.03; top_p 0.8 keeps the first two
    scores = torch.tensor([-4.0, 2.0, 0.0, 3.0, 1.0, -3.0])
    freq = _frequencies(pick, scores, SamplingParams(top_k=4, top_p=0.8, guidance=1.0))
    expected = _masked_softmax(scores, [3, 1])
    assert freq[[0, 2, 4, 5]].sum() == 0
    assert torch.allclose(freq, expected, atol=0.03)


def test_temperature_flattens_the_distribution(pick: Pick) -> None:
    scores = torch.tensor([2.0, 1.0, 0.0, -1.0])
    freq = _frequencies(pick, scores, SamplingParams(top_k=0, temperature=2.0, guidance=1.0))
    assert torch.allclose(freq, (scores / 2.0).softmax(-1), atol=0.03)


def test_greedy_is_the_argmax(pick: Pick) -> None:
    scores = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).float()
    assert torch.equal(
        pick(scores, SamplingParams(top_k=1, guidance=1.0), torch.rand(3, 4)), scores.argmax(-1)
    )


def test_the_ends_of_the_draws_take_the_first_and_the_last_token_kept(pick: Pick) -> None:
    scores = torch.tensor([[[-9.0, 1.0, -9.0, 2.0, 0.5, -9.0]]])  # top 3: tokens 1, 3, 4
    params = SamplingParams(top_k=3, guidance=1.0)
    assert pick(scores, params, torch.tensor([[0.0]])).item() == 1
    assert pick(scores, params, torch.tensor([[1.0 - 2**-24]])).item() == 4


def test_ties_in_one_codebook_leave_the_others_to_their_top_k(pick: Pick) -> None:
    # codebook 0 ties three ways at its 2nd place (so it keeps 4 candidates); codebook 1 has no ties and
    # must still draw from its top 2 alone
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, -5.0, 0.0], [0.0, 2.0, 1.0, 3.0, -1.0, 0.5]])
    draws = torch.rand(1, DRAWS * 2, generator=torch.Generator().manual_seed(0))
    tokens = pick(
        scores.expand(1, DRAWS, 2, 6).reshape(1, DRAWS * 2, 6), SamplingParams(top_k=2, guidance=1.0), draws
    )
    second = torch.bincount(tokens.view(DRAWS, 2)[:, 1], minlength=6).float() / DRAWS
    assert torch.allclose(second, _masked_softmax(scores[1], [3, 1]), atol=0.03)


def test_a_rows_draw_depends_on_its_own_scores_and_numbers_alone(pick: Pick) -> None:
    g = torch.Generator().manual_seed(3)
    scores = (torch.randn(3, 4, 2048, generator=g) * 3).to(torch.bfloat16).float()  # bf16 logits tie often
    scores[2, 1, :300] = 50.0  # another row: 300 scores tied for the best, past top_k
    params = SamplingParams(guidance=1.0)  # top_k 250, as the bot uses
    for seed in range(10):
        draws = pass_uniforms([torch.Generator().manual_seed(seed + i) for i in range(3)], 1, 4)[0]
        together = pick(scores, params, draws)
        for row in range(3):
            changed = scores.clone()
            changed[(row + 1) % 3] = torch.randn(4, 2048, generator=g)
            assert torch.equal(
                pick(scores[row : row + 1], params, draws[row : row + 1]), together[row : row + 1]
            )
            assert torch.equal(pick(changed, params, draws)[row], together[row])


def test_each_rows_numbers_come_from_its_own_seed() -> None:
    both = pass_uniforms([torch.Generator().manual_seed(s) for s in (5, 6)], 10, 4)
    alone = pass_uniforms([torch.Generator().manual_seed(6)], 10, 4)
    assert both.shape == (10, 2, 4) and torch.equal(both[:, 1:], alone)


def test_the_native_choice_is_torchs_from_the_same_numbers(kernels: native.NativeKernels) -> None:
    """Guided bf16 logits of four requests, the bot's settings: the same tokens either way, but where a
    draw lands within rounding of a boundary between two tokens (two fp32 sums in different orders)."""
    g = torch.Generator().manual_seed(11)
    same = total = 0
    for temperature, top_k in ((1.0, 250), (0.7, 50), (1.3, 0)):
        params = SamplingParams(guidance=3.0, temperature=temperature, top_k=top_k)
        for _ in range(20):
            logits = (torch.randn(8, 4, 2048, generator=g) * 4).to(torch.bfloat16)
            draws = torch.rand(4, 4, generator=g)
            ours = next_tokens(logits, 4, params, draws, kernels)
            theirs = choose(
                logits[4:].float() + (logits[:4].float() - logits[4:].float()) * 3.0, params, draws
            )
            same += int((ours == theirs).sum())
            total += ours.numel()
    assert same >= total - 2, f"{total - same} of {total} differ"


@pytest.mark.parametrize("vocab", [2048, 2045])
def test_the_native_k_best_keep_ties_and_leave_out_minus_infinity_as_torchs_do(
    kernels: native.NativeKernels, vocab: int
) -> None:
    """Scores of a few values (ties at every k-th), rows with fewer finite scores than k, and a vocabulary
    that is not a multiple of sixteen: the native selection of the k best keeps what torch's keeps."""
    g = torch.Generator().manual_seed(12)
    same = total = 0
    for top_k in (2, 250, vocab - 1):
        params = SamplingParams(guidance=1.0, top_k=top_k)
        for _ in range(10):
            scores = torch.randint(-4, 5, (4, 4, vocab), generator=g).float()
            scores[1, 2, 100:] = float("-inf")  # 100 finite: fewer than k for the larger k
            scores[3, 0, ::2] = float("-inf")
            draws = torch.rand(4, 4, generator=g)
            ours = next_tokens(scores.to(torch.bfloat16), 4, params, draws, kernels)
            theirs = choose(scores, params, draws)
            same += int((ours == theirs).sum())
            total += ours.numel()
            kept = scores >= torch.topk(scores, top_k, dim=-1).values[..., -1:]
            assert kept.gather(-1, ours[..., None]).all(), "a token outside the k best (with ties)"
    assert same >= total - 2, f"{total - same} of {total} differ"


def test_scores_holding_nan_or_infinity_raise_a_clear_error(pick: Pick) -> None:
    scores = torch.randn(2, 4, 64)
    scores[1, 2, 7] = float("nan")
    scores[0, 0, 3] = float("inf")
    scores[1, 3] = float("-inf")  # nothing to draw from
    scores[0, 1, :10] = float("-inf")  # tokens of probability 0: fine
    with pytest.raises(NonFiniteScores, match=r"NaN or infinite \(3 of"):
        pick(scores, UNGUIDED, torch.rand(2, 4))
