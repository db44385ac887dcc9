"""Advantage estimators over dense rewards (step3_rlhf/algorithms/estimators.py), by hand.

Two prompts x two answers (groups [0, 0, 1, 1]); gamma 1. With sparse rewards each estimator
must be its published sequence-level form; with dense rewards the per-token credit survives
(returns-to-go minus the group baseline).
"""
from __future__ import annotations

import re
import statistics

import pytest
import torch
from torch.testing import assert_close

from step3_rlhf.algorithms.estimators import ESTIMATORS, EstimatorInputs, group_stats

T = torch.tensor
MASK = T([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
GROUP = T([0, 0, 1, 1])
SPARSE = T([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [3.0, 0.0, 0.0]])   # R = [2, 0, 1, 3]
DENSE = T([[1.0, 0.5, 0.5], [0.2, 0.3, 7.0], [0.0, 1.0, 0.0], [3.0, 9.0, 9.0]])    # R = [2, 0.5, 1, 3] (7, 9 masked)
S2 = 2 ** 0.5


def run(name, rewards, kl=None, kl_ctl=0.0, group=GROUP, mask=MASK, clip=100.0):
    kl = torch.zeros(rewards.shape) if kl is None else kl
    return ESTIMATORS[name](EstimatorInputs(rewards, mask, kl, group, kl_ctl, gamma=1.0, clip=clip))


def test_group_stats():
    total, size, std = group_stats(T([2.0, 0.0, 1.0, 3.0, 5.0]), T([0, 0, 1, 1, 1]))
    assert_close(total, T([2.0, 2.0, 9.0, 9.0, 9.0]))
    assert_close(size, T([2.0, 2.0, 3.0, 3.0, 3.0]))
    assert_close(std, T([S2, S2, 2.0, 2.0, 2.0]))   # unbiased: group 1 = {1, 3, 5}, variance 4


def test_grpo_sparse_is_the_group_normalised_outcome_reward():
    # group 0: R = 2, 0: mean 1, std sqrt(2); group 1: R = 1, 3: mean 2, std sqrt(2)
    a = 1 / S2
    expected = T([[a, a, a], [-a, -a, 0.0], [-a, -a, -a], [a, 0.0, 0.0]])
    assert_close(run("grpo", SPARSE), expected, atol=1e-5, rtol=0)


def test_grpo_dense_keeps_returns_to_go():
    # group 0: R = 2, 0.5 -> mean 1.25, std 0.75 * sqrt(2) = 1.06066
    # row 0: returns-to-go [2, 1, 0.5] -> ([2, 1, 0.5] - 1.25) / 1.06066; row 1: [0.5, 0.3]
    # group 1: R = 1, 3 -> mean 2, std sqrt(2); row 2: [1, 1, 0]; row 3: [3]
    s0 = 0.75 * S2
    expected = T([[0.75 / s0, -0.25 / s0, -0.75 / s0], [-0.75 / s0, -0.95 / s0, 0.0],
                  [-1 / S2, -1 / S2, -2 / S2], [1 / S2, 0.0, 0.0]])
    assert_close(run("grpo", DENSE), expected, atol=1e-5, rtol=0)


def test_rloo_sparse_is_leave_one_out():
    # k = 2: the baseline is the other answer's R: [2 - 0, 0 - 2, 1 - 3, 3 - 1]
    expected = T([[2.0, 2.0, 2.0], [-2.0, -2.0, 0.0], [-2.0, -2.0, -2.0], [2.0, 0.0, 0.0]])
    assert_close(run("rloo", SPARSE), expected)


def test_rloo_dense_returns_to_go_minus_the_others_totals():
    # row 0: [2, 1, 0.5] - 0.5; row 1: [0.5, 0.3] - 2; row 2: [1, 1, 0] - 3; row 3: [3] - 1
    expected = T([[1.5, 0.5, 0.0], [-1.5, -1.7, 0.0], [-2.0, -2.0, -3.0], [2.0, 0.0, 0.0]])
    assert_close(run("rloo", DENSE), expected)


def test_rloo_with_three_answers_averages_the_other_two():
    rewards = T([[1.0], [2.0], [6.0]])
    out = run("rloo", rewards, group=T([0, 0, 0]), mask=torch.ones(3, 1))
    assert_close(out, T([[1 - 4.0], [2 - 3.5], [6 - 1.5]]))


def test_reinforce_pp_kl_inside_the_reward_then_batch_normalised():
    kl = T([[0.5, -1.0, 0.0], [0.0, 0.2, 9.0], [1.0, 1.0, 1.0], [0.0, 5.0, 5.0]])
    # r - 0.1 kl: row 0 [-0.05, 0.1, 2] -> returns [2.05, 2.1, 2]; row 1 [0, -0.02] -> [-0.02, -0.02]
    # row 2 [-0.1, -0.1, 0.9] -> [0.7, 0.8, 0.9]; row 3 [3] -> [3]; masked positions take no part
    returns = [[2.05, 2.1, 2.0], [-0.02, -0.02], [0.7, 0.8, 0.9], [3.0]]
    flat = [v for row in returns for v in row]
    mean, std = statistics.mean(flat), statistics.stdev(flat)
    out = run("reinforce_pp", SPARSE, kl=kl, kl_ctl=0.1)
    for i, row in enumerate(returns):
        assert_close(out[i, :len(row)], T([(v - mean) / std for v in row]), atol=1e-5, rtol=0)
        assert torch.all(out[i, len(row):] == 0)


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp"])
def test_sparse_reduces_exactly_to_the_published_sequence_form(name):
    g = torch.Generator().manual_seed(0)
    b, t, k = 12, 6, 3
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    scores = torch.randn(b, generator=g) * 2
    rewards = torch.zeros(b, t)
    rewards[torch.arange(b), lengths - 1] = scores
    group = torch.arange(b // k).repeat_interleave(k)
    out = run(name, rewards, group=group, mask=mask)
    per_group = scores.view(-1, k)
    if name == "grpo":       # (R - mean) / std over the group
        seq = ((per_group - per_group.mean(1, keepdim=True)) / per_group.std(1, keepdim=True)).flatten()
    elif name == "rloo":     # R - mean of the other k - 1
        seq = (per_group - (per_group.sum(1, keepdim=True) - per_group) / (k - 1)).flatten()
    else:                    # every token's return is R: normalised over the batch's tokens
        tokens = scores.repeat_interleave(lengths)
        seq = (scores - tokens.mean()) / tokens.std()
    assert_close(out, seq[:, None] * mask, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_dense_credit_survives_where_sparse_is_flat(name):
    """The same totals, spread differently over the tokens: different per-token advantages, and the
    first token's advantage equal to the sparse one (its return-to-go is the whole R)."""
    dense, sparse = run(name, DENSE), run(name, at_last(DENSE * MASK))
    assert_close(dense[:, 0], sparse[:, 0], atol=1e-5, rtol=0)
    assert not torch.allclose(dense * MASK, sparse * MASK)


def at_last(rewards: torch.Tensor) -> torch.Tensor:
    """Each row's (masked) total on its last response token."""
    out = torch.zeros_like(rewards)
    last = MASK.sum(-1) - 1
    out[torch.arange(len(out)), last] = rewards.sum(-1)
    return out


def test_total_clip_applies_before_the_baseline():
    rewards = T([[4.0, 4.0], [0.0, 1.0]])   # R = 8 -> clipped to 5 (each token scaled by 5/8)
    out = run("rloo", rewards, group=T([0, 0]), mask=torch.ones(2, 2, dtype=torch.long), clip=5.0)
    assert_close(out, T([[5.0 - 1.0, 2.5 - 1.0], [1.0 - 5.0, 1.0 - 5.0]]))


def run_per_token(name, rewards, group=GROUP, mask=MASK, baseline_rewards=None):
    x = EstimatorInputs(rewards, mask, torch.zeros(rewards.shape), group, 0.0, gamma=1.0, clip=100.0,
                        baseline=None if baseline_rewards is None else baseline_rewards.sum(-1),
                        baseline_rewards=baseline_rewards, per_token=True)
    return ESTIMATORS[name](x)


def test_rloo_per_token_subtracts_the_other_answers_return_to_go_at_each_position():
    # returns-to-go: row 0 [2, 1, 0.5], row 1 [0.5, 0.3, 0]; row 2 [1, 1, 0], row 3 [3, 0, 0] (0 past the end)
    expected = T([[1.5, 0.7, 0.5], [-1.5, -0.7, 0.0], [-2.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    assert_close(run_per_token("rloo", DENSE), expected)


def test_grpo_per_token_centres_each_position_on_the_groups_mean_return_to_go():
    # group 0: mean to-go [1.25, 0.65, 0.25], std of totals 0.75 * sqrt(2); group 1: [2, 0.5, 0], sqrt(2)
    s0 = 0.75 * S2
    expected = T([[0.75 / s0, 0.35 / s0, 0.25 / s0], [-0.75 / s0, -0.35 / s0, 0.0],
                  [-1 / S2, 0.5 / S2, 0.0], [1 / S2, 0.0, 0.0]])
    assert_close(run_per_token("grpo", DENSE), expected, atol=1e-5, rtol=0)


def test_remax_per_token_subtracts_the_greedy_answers_return_to_go():
    # sampled to-go [2, 1, 0.5]; the greedy answer is 2 tokens, to-go [0.5, 0.3], then 0
    out = run_per_token("remax", T([[1.0, 0.5, 0.5]]), group=T([0]), mask=torch.ones(1, 3),
                        baseline_rewards=T([[0.2, 0.3]]))
    assert_close(out, T([[1.5, 0.7, 0.5]]))


@pytest.mark.parametrize("name", ["remax", "grpo", "rloo"])
def test_per_token_is_the_total_form_for_sparse_rewards_of_equal_length(name):
    g = torch.Generator().manual_seed(1)
    b, t = 6, 4
    rewards, greedy = torch.zeros(b, t), torch.zeros(b, t)
    rewards[:, -1], greedy[:, -1] = torch.randn(b, generator=g), torch.randn(b, generator=g)
    mask, group = torch.ones(b, t), torch.arange(b // 3).repeat_interleave(3)
    total = ESTIMATORS[name](EstimatorInputs(rewards, mask, torch.zeros(b, t), group, 0.0, 1.0, 100.0,
                                             baseline=greedy.sum(-1)))
    assert_close(run_per_token(name, rewards, group, mask, baseline_rewards=greedy), total, atol=1e-6, rtol=0)
    assert not torch.allclose(run_per_token(name, DENSE, baseline_rewards=DENSE.flip(0) * MASK.flip(0)),
                              ESTIMATORS[name](EstimatorInputs(DENSE, MASK, torch.zeros(4, 3), GROUP, 0.0, 1.0, 100.0,
                                                               baseline=(DENSE.flip(0) * MASK.flip(0)).sum(-1))))


def test_rloo_per_token_baseline_does_not_depend_on_the_answer_it_is_subtracted_from():
    """Unbiased: changing answer 0's rewards moves its advantages by exactly its own change in return-to-go."""
    changed = DENSE.clone()
    changed[0] = T([0.0, 3.0, -1.0])
    delta = run_per_token("rloo", changed)[0] - run_per_token("rloo", DENSE)[0]
    assert_close(delta, T([2.0, 2.0, -1.0]) - T([2.0, 1.0, 0.5]))


@pytest.mark.parametrize("argv,message", [
    (["--algo", "grpo", "--num_generations", "1"], "--num_generations must be at least 2"),
    (["--algo", "remax", "--num_generations", "2"], "--num_generations 1"),
    (["--algo", "ppo", "--dense_baseline", "per_token"], "--algo ppo has none to place"),
    (["--algo", "reinforce_pp", "--dense_baseline", "per_token"], "--algo reinforce_pp has none to place"),
])
def test_stage3_refuses_settings_an_estimator_cannot_take(argv, message):
    from common.config import RLHFConfig, parse_config
    from common.errors import ConfigError
    from step3_rlhf.main import check
    cfg = parse_config(RLHFConfig, ["--actor_model_name_or_path", "x", "--reward_model_name_or_path", "y",
                                    "--per_device_training_batch_size", "1", *argv])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(cfg)
