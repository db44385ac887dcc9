"""Reward dropout (Lee and Lim, 2024; ALGORITHMS.md section 1): which samples keep their weight."""
from __future__ import annotations

import math

import pytest
import torch

from common.reward_dropout import dropout_scores, reward_dropout


def shuffled_scores(n: int, seed: int = 0) -> torch.Tensor:
    """Distinct scores 0..n-1 in a seeded random order (so 'the top k' is unambiguous)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g).float() * 0.5 - 3.0


def kept(weights: torch.Tensor) -> set[int]:
    return set(torch.nonzero(weights).flatten().tolist())


@pytest.mark.parametrize("q,b,k", [
    (0.9, 20, 2),    # round(0.1 * 20) = 2: the two highest
    (0.5, 20, 10),   # round(0.5 * 20) = 10
    (0.75, 8, 2),    # round(0.25 * 8) = 2
    (0.2, 10, 8),    # round(0.8 * 10) = 8
])
def test_quantile_keeps_exactly_the_top_samples(q, b, k):
    scores = shuffled_scores(b)
    out = reward_dropout(torch.ones(b), scores, "quantile", q)
    top = set(torch.argsort(scores, descending=True)[:k].tolist())
    assert kept(out) == top
    # every kept score beats every dropped one
    assert scores[list(top)].min() > scores[[i for i in range(b) if i not in top]].max()


def test_quantile_q09_keeps_the_two_highest_by_hand():
    scores = torch.tensor([0.1, 5.0, -2.0, 0.3, 0.2, 0.0, 1.0, 0.4, 0.5, 0.6,
                           0.7, 0.8, 0.9, 1.1, 1.2, 1.3, 1.4, 4.0, 1.5, 1.6])
    out = reward_dropout(torch.ones(20), scores, "quantile", 0.9)
    assert kept(out) == {1, 17}          # 5.0 and 4.0


def test_quantile_keeps_at_least_one_sample():
    scores = shuffled_scores(20)
    # round(0.01 * 20) = 0 -> still one kept: the best
    out = reward_dropout(torch.ones(20), scores, "quantile", 0.99)
    assert kept(out) == {int(scores.argmax())}
    single = reward_dropout(torch.ones(1), torch.tensor([-7.0]), "quantile", 0.9)
    assert single.tolist() == [1.0]


def test_quantile_keeps_the_weights_of_kept_samples_and_zeroes_the_rest():
    scores = torch.tensor([3.0, -1.0, 2.0, 0.0])
    weights = torch.tensor([0.5, 2.0, 1.5, 4.0])
    out = reward_dropout(weights, scores, "quantile", 0.5)   # keeps round(0.5 * 4) = 2: samples 0 and 2
    assert out.tolist() == [0.5, 0.0, 1.5, 0.0]


def test_random_keeps_the_expected_fraction():
    n, rate = 100_000, 0.3
    g = torch.Generator().manual_seed(1234)
    out = reward_dropout(torch.ones(n), torch.zeros(n), "random", rate, g)
    frac = out.mean().item()
    std = math.sqrt(rate * (1 - rate) / n)          # binomial std of the kept fraction: ~0.00145
    assert abs(frac - (1 - rate)) < 5 * std
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_random_ignores_the_scores():
    n = 1000
    a = reward_dropout(torch.ones(n), torch.zeros(n), "random", 0.5, torch.Generator().manual_seed(7))
    b = reward_dropout(torch.ones(n), torch.randn(n), "random", 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_random_is_reproducible_with_the_same_seed():
    n = 1000
    scores = torch.randn(n)
    a = reward_dropout(torch.ones(n), scores, "random", 0.4, torch.Generator().manual_seed(42))
    b = reward_dropout(torch.ones(n), scores, "random", 0.4, torch.Generator().manual_seed(42))
    c = reward_dropout(torch.ones(n), scores, "random", 0.4, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("mode,rate", [("none", 0.9), ("quantile", 0.0), ("random", 0.0)])
def test_none_or_zero_rate_is_identity(mode, rate):
    weights = torch.tensor([0.5, 1.0, 2.0])
    out = reward_dropout(weights, torch.tensor([1.0, -1.0, 0.0]), mode, rate, torch.Generator().manual_seed(0))
    assert torch.equal(out, weights)


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="topk"):
        reward_dropout(torch.ones(3), torch.zeros(3), "topk", 0.5)


def test_dropout_scores_by_hand():
    """b_i = R_i + log(mean_t pi_ref(y_t)) over the response tokens only."""
    ref_logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.1, 0.4]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    scores = torch.tensor([2.0, -1.0])
    # row 0: mean(0.5, 0.25) = 0.375 (0.9 is padding) -> 2 + log 0.375 = 2 - 0.98083 = 1.01917
    # row 1: mean(0.1, 0.1, 0.4) = 0.2 -> -1 + log 0.2 = -1 - 1.60944 = -2.60944
    expected = torch.tensor([2.0 + math.log(0.375), -1.0 + math.log(0.2)])
    torch.testing.assert_close(dropout_scores(scores, ref_logprobs, mask), expected)


def test_dropout_scores_prefer_likely_responses_at_equal_reward():
    ref_logprobs = torch.log(torch.tensor([[0.9, 0.9], [0.1, 0.1]]))
    b = dropout_scores(torch.tensor([1.0, 1.0]), ref_logprobs, torch.ones(2, 2))
    assert b[0] > b[1]
    # and the quantile mode then keeps the likely one
    assert reward_dropout(torch.ones(2), b, "quantile", 0.5).tolist() == [1.0, 0.0]
