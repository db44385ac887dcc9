"""PPO as in DeepSpeed-Chat: critic from the reward model, GAE, clipped policy and value losses.

Per-token reward = dense reward (sequence total clipped to +-c) - kl * (log pi_old - log pi_ref).
Every actor and critic micro-batch is its own optimizer step (common/update.py), so a
non-finite loss skips just that update (the guard's decision is the same on every rank).
"""
from __future__ import annotations

import math

import torch

from step3_rlhf.algorithms.base import (clip_total, masked_mean, micro_batches, policy_logprobs,
                                        register_algorithm)
from common.heads import token_values
from common.update import Accumulation


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns) by generalised advantage estimation over each response."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    t_max = rewards.shape[1]
    for t in reversed(range(t_max)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < t_max else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


@register_algorithm("ppo")
class PPO:
    needs_greedy, needs_critic = False, True

    def __init__(self, cfg, strategy, actor, critic):
        self.cfg, self.strategy, self.actor, self.critic = cfg, strategy, actor, critic
        self.kl_ctl = cfg.kl_ctl

    def token_rewards(self, rollout) -> torch.Tensor:
        s = rollout.sampled
        return (clip_total(s.rewards, self.cfg.cliprange_reward) - self.kl_ctl * rollout.kl) * s.response_mask

    def train(self, rollout, weights: torch.Tensor, guard) -> dict:
        cfg, s = self.cfg, rollout.sampled
        mask = s.response_mask
        advantages, returns = gae(self.token_rewards(rollout), rollout.values, mask, cfg.gamma, cfg.lam)
        t = mask.shape[1]
        stats: dict[str, list] = {"actor_loss": [], "critic_loss": [], "clip_fraction": [], "entropy": []}
        actor_update = Accumulation(self.strategy, self.actor, guard, 1, "actor loss")
        critic_update = Accumulation(self.strategy, self.critic, guard, 1, "critic loss")
        for _ in range(cfg.ppo_epochs):
            for mb in micro_batches(s.seq.shape[0], cfg.per_device_training_batch_size):
                m = mask[mb].float() * weights[mb, None]
                logp, entropy = policy_logprobs(self.actor, s.seq[mb], s.mask[mb], t)
                dev = logp.device
                ratio = torch.exp(logp - rollout.actor_logprobs[mb].to(dev))
                adv = advantages[mb].to(dev)
                pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange))
                actor_loss = masked_mean(pg, m.to(dev))
                if actor_update.add(actor_loss) and actor_update.step():
                    stats["actor_loss"].append(actor_loss.item())

                v = token_values(self.critic, s.seq[mb].to(self.critic.device),
                                 s.mask[mb].to(self.critic.device))[:, -t - 1:-1]
                old_v, ret = rollout.values[mb].to(v.device), returns[mb].to(v.device)
                v_clip = old_v + (v - old_v).clamp(-cfg.cliprange_value, cfg.cliprange_value)
                critic_loss = 0.5 * masked_mean(torch.max((v - ret) ** 2, (v_clip - ret) ** 2),
                                                mask[mb].float().to(v.device))
                if critic_update.add(critic_loss) and critic_update.step():
                    stats["critic_loss"].append(critic_loss.item())

                clipped = ((ratio - 1).abs() > cfg.cliprange).float().cpu()
                stats["clip_fraction"].append(masked_mean(clipped, mask[mb]).item())
                stats["entropy"].append(masked_mean(entropy.cpu(), mask[mb]).item())
        out = {k: sum(v) / len(v) if v else math.nan for k, v in stats.items()}
        out["advantage"] = masked_mean(advantages, mask).item()
        out["value"] = masked_mean(rollout.values, mask).item()
        self._adapt_kl(rollout)
        out["kl_ctl"] = self.kl_ctl
        return out

    def _adapt_kl(self, rollout) -> None:
        """Ziegler et al.'s proportional controller towards kl_target (nats per sequence)."""
        if not self.cfg.adaptive_kl:
            return
        kl = (rollout.kl * rollout.sampled.response_mask).sum(-1).mean()
        kl = self.strategy.all_reduce_mean({"kl": kl.item()})["kl"]  # every rank keeps the same kl_ctl
        error = min(max(kl / self.cfg.kl_target - 1, -0.2), 0.2)
        n = rollout.sampled.seq.shape[0] * self.strategy.world_size
        self.kl_ctl *= 1 + error * n / self.cfg.kl_horizon
