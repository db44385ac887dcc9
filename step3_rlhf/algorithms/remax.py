"""ReMax (Li et al., 2024): REINFORCE with the greedy response's reward as baseline.

No critic, no ratio, no clipping of the update; one optimizer step per rollout batch.
    A   = clip(R(x, y) - R(x, y_greedy), -c, c)
    G_i = gamma^(n - i) * A - kl * (log pi(y_i) - log pi_ref(y_i))
    loss = - sum_i G_i log pi_theta(y_i) / sum mask
With dense rewards r_t the baseline sits on the last token, so G_i is the discounted
reward-to-go of (r - b [t = n]), whose sum is R - R_greedy.
"""
from __future__ import annotations

import torch

from step3_rlhf.algorithms.base import (baseline_subtracted, clip_total, discounted_returns,
                                        masked_mean, micro_batches, policy_logprobs, register_algorithm)


def remax_returns(rollout, kl_ctl: float, gamma: float, clip: float) -> torch.Tensor:
    s = rollout.sampled
    baseline = rollout.greedy.rewards.sum(-1)
    advantage = clip_total(baseline_subtracted(s.rewards, s.response_mask, baseline), clip)
    kl = rollout.actor_logprobs - rollout.ref_logprobs
    return (discounted_returns(advantage, s.response_mask, gamma) - kl_ctl * kl) * s.response_mask


@register_algorithm("remax")
class ReMax:
    needs_greedy, needs_critic = True, False

    def __init__(self, cfg, strategy, actor, critic=None):
        self.cfg, self.strategy, self.actor = cfg, strategy, actor
        self.kl_ctl = cfg.kl_ctl

    def train(self, rollout, weights: torch.Tensor) -> dict:
        cfg, s = self.cfg, rollout.sampled
        returns = remax_returns(rollout, self.kl_ctl, cfg.gamma, cfg.cliprange_reward)
        t = s.response_mask.shape[1]
        losses, entropies = [], []
        for mb in micro_batches(s.seq.shape[0], cfg.per_device_training_batch_size):
            logp, entropy = policy_logprobs(self.actor, s.seq[mb], s.mask[mb], t)
            m = (s.response_mask[mb] * weights[mb, None]).to(logp.device)
            loss = -(returns[mb].to(logp.device) * logp * m).sum() / m.sum().clamp(min=1)
            self.strategy.backward(self.actor, loss)
            self.strategy.step(self.actor)
            losses.append(loss.item())
            entropies.append(masked_mean(entropy.cpu(), s.response_mask[mb]).item())
        return {"actor_loss": sum(losses) / len(losses), "entropy": sum(entropies) / len(entropies),
                "greedy_score": rollout.greedy.scores.mean().item(),
                "advantage": (s.rewards.sum(-1) - rollout.greedy.rewards.sum(-1)).mean().item()}
