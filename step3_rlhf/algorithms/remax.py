"""ReMax (Li et al., 2024): REINFORCE with the greedy response's reward as baseline.

No critic, no ratio, no clipping of the update; one optimizer step per rollout batch
(its micro-batches accumulate). A non-finite loss in the first micro-batch skips the
update whole (`train` returns None); in a later one the earlier micro-batches are
already accumulated in ZeRO's buffers, so the run stops instead of stepping on them.
    A   = clip(R(x, y) - R(x, y_greedy), -c, c)
    G_i = gamma^(n - i) * A - kl * (log pi(y_i) - log pi_ref(y_i))
    loss = - sum_i G_i log pi_theta(y_i) / sum mask
With dense rewards r_t the baseline sits on the last token, so G_i is the discounted
reward-to-go of (r - b [t = n]), whose sum is R - R_greedy.
"""
from __future__ import annotations

import torch

from common.errors import DensehfError
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

    def train(self, rollout, weights: torch.Tensor, guard) -> dict | None:
        cfg, s = self.cfg, rollout.sampled
        returns = remax_returns(rollout, self.kl_ctl, cfg.gamma, cfg.cliprange_reward)
        t = s.response_mask.shape[1]
        losses, entropies = [], []
        for i, mb in enumerate(micro_batches(s.seq.shape[0], cfg.per_device_training_batch_size)):
            logp, entropy = policy_logprobs(self.actor, s.seq[mb], s.mask[mb], t)
            m = (s.response_mask[mb] * weights[mb, None]).to(logp.device)
            loss = -(returns[mb].to(logp.device) * logp * m).sum() / m.sum().clamp(min=1)
            if not guard.update(self.actor, loss, "actor loss"):
                if i == 0:
                    return None
                raise DensehfError(f"step {guard.step}: non-finite actor loss in micro-batch {i + 1} of a "
                                   "ReMax update whose first micro-batches are already accumulated: stopping")
            losses.append(loss.item())
            entropies.append(masked_mean(entropy.cpu(), s.response_mask[mb]).item())
        return {"actor_loss": sum(losses) / len(losses), "entropy": sum(entropies) / len(entropies),
                "greedy_score": rollout.greedy.scores.mean().item(),
                "advantage": (s.rewards.sum(-1) - rollout.greedy.rewards.sum(-1)).mean().item()}
