"""Stage-3 returns and advantages on hand-built rollouts (ALGORITHMS.md section 2).

ReMax: G_i = gamma^(n - i) * clip(R - R_greedy) - kl * (log pi - log pi_ref); with dense
rewards the greedy total is a baseline on the last token. PPO: GAE over the per-token
reward (clipped dense reward - kl * (log pi - log pi_ref)).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from common.rewards import RewardInputs, compute_rewards
from step3_rlhf.algorithms.base import baseline_subtracted, clip_total, discounted_returns, masked_mean
from step3_rlhf.algorithms.ppo import PPO, gae
from step3_rlhf.algorithms.critic_free import estimator_inputs
from step3_rlhf.algorithms.estimators import ESTIMATORS
from step3_rlhf.rollout import Responses, Rollout

T = torch.tensor


# ---- base helpers --------------------------------------------------------------------
def test_discounted_returns_gamma_one_with_masked_tail():
    rewards = T([[1.0, 2.0, 3.0, 7.0], [0.5, -1.0, 0.0, 2.0]])
    mask = T([[1, 1, 1, 0], [1, 1, 1, 1]])
    # row 0: the 7 on the masked tail is ignored: [1+2+3, 2+3, 3, 0] = [6, 5, 3, 0]
    # row 1: [1.5, 1.0, 2.0, 2.0]
    assert_close(discounted_returns(rewards, mask, 1.0), T([[6.0, 5.0, 3.0, 0.0], [1.5, 1.0, 2.0, 2.0]]))


def test_discounted_returns_gamma_09():
    rewards = T([[1.0, 2.0, 3.0, 7.0]])
    mask = T([[1, 1, 1, 0]])
    # G_3 = 3; G_2 = 2 + 0.9 * 3 = 4.7; G_1 = 1 + 0.9 * 4.7 = 5.23; tail 0
    assert_close(discounted_returns(rewards, mask, 0.9), T([[5.23, 4.7, 3.0, 0.0]]))


def test_clip_total_leaves_rows_within_the_limit_and_scales_the_others():
    rewards = T([[1.0, 2.0, 0.0],     # total 3: within 5, unchanged
                 [4.0, 4.0, 2.0],     # total 10 -> x 0.5 -> [2, 2, 1], total 5
                 [-3.0, -6.0, -1.0],  # total -10 -> x 0.5 -> [-1.5, -3, -0.5], total -5
                 [5.0, 0.0, 0.0],     # total exactly 5: unchanged
                 [9.0, -4.0, 0.0]])   # total 5 (mixed signs): unchanged
    out = clip_total(rewards, 5.0)
    assert_close(out, T([[1.0, 2.0, 0.0], [2.0, 2.0, 1.0], [-1.5, -3.0, -0.5], [5.0, 0.0, 0.0], [9.0, -4.0, 0.0]]))
    assert_close(out.sum(-1), T([3.0, 5.0, -5.0, 5.0, 5.0]))


def test_baseline_subtracted_moves_the_total_by_the_baseline_on_the_last_token():
    rewards = T([[0.5, 0.5, 0.5, 0.0]])
    mask = T([[1, 1, 1, 0]])
    # baseline 2 on the last response token (index 2): [0.5, 0.5, -1.5, 0], total 1.5 - 2 = -0.5
    assert_close(baseline_subtracted(rewards, mask, T([2.0])), T([[0.5, 0.5, -1.5, 0.0]]))


def test_masked_mean():
    # (1 + 3) / 2 = 2
    assert masked_mean(T([[1.0, 100.0], [3.0, -50.0]]), T([[1, 0], [1, 0]])).item() == 2.0


# ---- rollouts ------------------------------------------------------------------------
def responses(mask: torch.Tensor, scores: torch.Tensor, calculator: str) -> Responses:
    cfg = SimpleNamespace(reward_calculator=calculator, abc_beta=0.8, tlcr_add_sequence_reward=False,
                          composite_weights="")
    r = compute_rewards(RewardInputs(mask=mask, scores=scores), cfg)
    b, t = mask.shape
    seq = torch.zeros(b, 2 + t, dtype=torch.long)          # not read by the return computations
    return Responses(seq=seq, mask=torch.ones_like(seq), response_mask=mask, scores=scores, rewards=r)


SAMPLED_MASK = T([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
GREEDY_MASK = T([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
LOGP = T([[-1.0, -2.0, -0.5, -3.0], [-0.2, -0.4, -0.6, -0.8], [-1.0, -1.0, -9.0, -9.0]])
REF = T([[-1.5, -1.0, -0.5, -8.0], [-0.2, -0.2, -0.2, -0.2], [-2.0, -0.5, -1.0, -1.0]])
KL = (LOGP - REF) * SAMPLED_MASK   # [[0.5, -1, 0, 0], [0, -0.2, -0.4, -0.6], [1, -0.5, 0, 0]]


def rollout(sampled_scores, greedy_scores, calculator) -> Rollout:
    return Rollout(prompts=["a", "b", "c"], prompt_width=2,
                   sampled=responses(SAMPLED_MASK, sampled_scores, calculator),
                   actor_logprobs=LOGP.clone(), ref_logprobs=REF.clone(),
                   greedy=responses(GREEDY_MASK, greedy_scores, calculator))


def remax_returns(ro, kl_ctl: float, gamma: float, clip: float) -> torch.Tensor:
    return ESTIMATORS["remax"](estimator_inputs(ro, kl_ctl, gamma, clip))


def test_remax_returns_sparse_by_hand():
    ro = rollout(T([2.0, 9.0, -4.0]), T([0.5, 1.0, 3.0]), "sparse")
    g = remax_returns(ro, kl_ctl=0.1, gamma=0.9, clip=5.0)
    # A = clip(R - R_greedy, -5, 5) = [1.5, clip(8) = 5, clip(-7) = -5]
    # row 0, n = 3: gamma^(n-i) A = [0.81, 0.9, 1] * 1.5 = [1.215, 1.35, 1.5]
    #        - 0.1 * [0.5, -1, 0] = [1.165, 1.45, 1.5], tail 0
    # row 1, n = 4: [0.729, 0.81, 0.9, 1] * 5 = [3.645, 4.05, 4.5, 5]
    #        - 0.1 * [0, -0.2, -0.4, -0.6] = [3.645, 4.07, 4.54, 5.06]
    # row 2, n = 2: [0.9, 1] * -5 = [-4.5, -5] - 0.1 * [1, -0.5] = [-4.6, -4.95], tail 0
    expected = T([[1.165, 1.45, 1.5, 0.0], [3.645, 4.07, 4.54, 5.06], [-4.6, -4.95, 0.0, 0.0]])
    assert_close(g, expected)


def test_remax_returns_match_the_reference_formula():
    """The same, computed straight from G_i = gamma^(n-i) * clip(R - R_g) - kl * (logp - ref)."""
    scores, greedy = T([2.0, 9.0, -4.0]), T([0.5, 1.0, 3.0])
    gamma, kl_ctl, clip = 0.95, 0.05, 5.0
    g = remax_returns(rollout(scores, greedy, "sparse"), kl_ctl, gamma, clip)
    adv = (scores - greedy).clamp(-clip, clip)
    n = SAMPLED_MASK.sum(-1)
    i = torch.arange(1, 5)[None].expand(3, -1)
    expected = (gamma ** (n[:, None] - i) * adv[:, None] - kl_ctl * KL) * SAMPLED_MASK
    assert_close(g, expected)


def test_remax_dense_uniform_first_return_sums_to_R_minus_greedy():
    scores, greedy = T([2.0, 3.0, -1.0]), T([0.5, 1.0, 0.5])
    ro = rollout(scores, greedy, "uniform")
    g = remax_returns(ro, kl_ctl=0.0, gamma=1.0, clip=5.0)
    # gamma 1: G_1 is the total of (r - R_greedy [t = n]) = R - R_greedy = [1.5, 2.0, -1.5]
    assert_close(g[:, 0], scores - greedy)
    # row 0 by hand: r = 2/3 each; last token 2/3 - 0.5 = 1/6 -> G = [1.5, 5/6, 1/6, 0]
    assert_close(g[0], T([1.5, 5 / 6, 1 / 6, 0.0]))
    # with a KL term, G_1 + kl * (logp - ref)_1 still gives R - R_greedy
    g_kl = remax_returns(ro, kl_ctl=0.1, gamma=1.0, clip=5.0)
    assert_close(g_kl[:, 0] + 0.1 * KL[:, 0], scores - greedy)


def test_remax_dense_total_is_clipped():
    ro = rollout(T([9.0, 3.0, -8.0]), T([1.0, 1.0, 1.0]), "uniform")
    g = remax_returns(ro, kl_ctl=0.0, gamma=1.0, clip=5.0)
    # R - R_greedy = [8, 2, -9] -> clipped totals [5, 2, -5]
    assert_close(g[:, 0], T([5.0, 2.0, -5.0]))
    assert torch.all(g[SAMPLED_MASK == 0] == 0)


# ---- PPO -----------------------------------------------------------------------------
def test_gae_by_hand_with_masked_tail():
    rewards = T([[0.1, -0.2, 1.0, 5.0]])     # 5.0 on the masked tail must not count
    values = T([[0.5, 0.4, 0.3, 9.0]])       # nor the tail value as a bootstrap
    mask = T([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # t=2: delta = 1.0 + 0 - 0.3 = 0.7;              A_2 = 0.7
    # t=1: delta = -0.2 + 0.3 - 0.4 = -0.3;          A_1 = -0.3 + 0.95 * 0.7 = 0.365
    # t=0: delta = 0.1 + 0.4 - 0.5 = 0.0;            A_0 = 0.0 + 0.95 * 0.365 = 0.34675
    assert_close(adv, T([[0.34675, 0.365, 0.7, 0.0]]))
    # returns = A + V on the response: [0.84675, 0.765, 1.0, 0]
    assert_close(ret, T([[0.84675, 0.765, 1.0, 0.0]]))


def test_gae_full_row_and_batch_rows_are_independent():
    rewards = T([[0.0, 0.0, 1.0], [0.1, -0.2, 1.0]])
    values = T([[0.2, 0.2, 0.2], [0.5, 0.4, 0.3]])
    mask = T([[1, 1, 1], [1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: deltas [0 + 0.2 - 0.2, 0 + 0.2 - 0.2, 1 - 0.2] = [0, 0, 0.8]
    #        A = [0.95^2 * 0.8, 0.95 * 0.8, 0.8] = [0.722, 0.76, 0.8]
    assert_close(adv[0], T([0.722, 0.76, 0.8]))
    assert_close(adv[1], T([0.34675, 0.365, 0.7]))
    assert_close(ret, adv + values)


def ppo(kl_ctl=0.1, clip=5.0) -> PPO:
    cfg = SimpleNamespace(kl_ctl=kl_ctl, cliprange_reward=clip, gamma=1.0, lam=0.95)
    return PPO(cfg, strategy=None, actor=None, critic=None)


def test_ppo_token_rewards_add_kl_and_clipped_dense_reward():
    ro = rollout(T([3.0, 10.0, -1.0]), T([0.0, 0.0, 0.0]), "uniform")
    r = ppo().token_rewards(ro)
    # row 0: uniform 3/3 = 1 on 3 tokens (total 3, within 5); -0.1 * KL[0] = [-0.05, 0.1, 0]
    #        -> [0.95, 1.1, 1.0, 0] (tail masked although logp - ref = 5 there)
    # row 1: uniform 10/4 = 2.5, total 10 -> scaled by 0.5 -> 1.25 each;
    #        -0.1 * [0, -0.2, -0.4, -0.6] -> [1.25, 1.27, 1.29, 1.31]
    # row 2: uniform -1/2 = -0.5; -0.1 * [1, -0.5] -> [-0.6, -0.45, 0, 0]
    expected = T([[0.95, 1.1, 1.0, 0.0], [1.25, 1.27, 1.29, 1.31], [-0.6, -0.45, 0.0, 0.0]])
    assert_close(r, expected)


def test_ppo_token_rewards_sparse_is_deepspeed_chat_reward():
    """Sparse: -kl * (logp - ref) everywhere, plus clip(R, -5, 5) on the last token."""
    ro = rollout(T([2.0, 7.0, -6.0]), T([0.0, 0.0, 0.0]), "sparse")
    r = ppo(kl_ctl=0.2).token_rewards(ro)
    expected = -0.2 * KL
    expected[0, 2] += 2.0
    expected[1, 3] += 5.0     # 7 clipped
    expected[2, 1] += -5.0    # -6 clipped
    assert_close(r, expected)


def test_adaptive_kl_moves_towards_the_target_identically_on_every_rank():
    """Ziegler's controller: above target kl_ctl grows, below it shrinks (capped at 20%)."""
    class OneRank:
        world_size = 1

        def all_reduce_mean(self, values):
            return dict(values)
    cfg = SimpleNamespace(kl_ctl=0.1, adaptive_kl=True, kl_target=1.0, kl_horizon=100)
    mask = torch.ones(4, 3)
    for per_token, direction in ((2.0, 1), (0.1, -1)):
        algo = PPO(cfg, OneRank(), actor=None, critic=None)
        rollout = SimpleNamespace(kl=torch.full((4, 3), per_token),
                                  sampled=SimpleNamespace(response_mask=mask, seq=torch.zeros(4, 5)))
        algo._adapt_kl(rollout)
        # kl per sequence 6.0 -> error capped at +0.2; 0.3 -> -0.2; n = 4 samples over horizon 100
        assert algo.kl_ctl == pytest.approx(0.1 * (1 + direction * 0.2 * 4 / 100))
