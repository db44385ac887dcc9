"""The critic-free algorithms: REINFORCE with an estimator's per-token returns (estimators.py).

ReMax (Li et al., 2024) takes the greedy answer's reward as baseline; GRPO, RLOO and
REINFORCE++ sample --num_generations answers per prompt in one generate call and take their
baselines from the group (or the batch). One optimizer step per rollout batch: its
micro-batches accumulate (common/update.py). A micro-batch whose loss is non-finite on any
rank is left out of the step; when all of them are, `train` returns None and the engine is
as it was.
    loss = - sum_t G_t log pi_theta(y_t) / sum mask
"""
from __future__ import annotations

import torch

from common.update import Accumulation
from step3_rlhf.algorithms.base import masked_mean, micro_batches, policy_logprobs, register_algorithm
from step3_rlhf.algorithms.estimators import ESTIMATORS, EstimatorInputs


def estimator_inputs(rollout, kl_ctl: float, gamma: float, clip: float, per_token: bool = False) -> EstimatorInputs:
    s, greedy = rollout.sampled, rollout.greedy
    group = rollout.group if rollout.group is not None else torch.arange(s.rewards.shape[0])
    return EstimatorInputs(rewards=s.rewards, mask=s.response_mask, kl=rollout.kl,
                           group=group, kl_ctl=kl_ctl, gamma=gamma, clip=clip,
                           baseline=greedy.rewards.sum(-1) if greedy is not None else None,
                           baseline_rewards=greedy.rewards if greedy is not None else None, per_token=per_token)


class CriticFree:
    needs_critic = False
    needs_greedy = False
    estimator = ""
    min_generations = 1     # samples per prompt the estimator's baseline needs

    def __init__(self, cfg, strategy, actor, critic=None):
        self.cfg, self.strategy, self.actor = cfg, strategy, actor
        self.kl_ctl = cfg.kl_ctl

    def returns(self, rollout) -> torch.Tensor:
        cfg = self.cfg
        return ESTIMATORS[self.estimator](estimator_inputs(rollout, self.kl_ctl, cfg.gamma, cfg.cliprange_reward,
                                                           cfg.dense_baseline == "per_token"))

    def train(self, rollout, weights: torch.Tensor, guard) -> dict | None:
        cfg, s = self.cfg, rollout.sampled
        returns = self.returns(rollout)
        t = s.response_mask.shape[1]
        batches = list(micro_batches(s.seq.shape[0], cfg.per_device_training_batch_size))
        update = Accumulation(self.strategy, self.actor, guard, len(batches), "actor loss")
        losses, entropies = [], []
        for mb in batches:
            logp, entropy = policy_logprobs(self.actor, s.seq[mb], s.mask[mb], t)
            m = (s.response_mask[mb] * weights[mb, None]).to(logp.device)
            loss = -(returns[mb].to(logp.device) * logp * m).sum() / m.sum().clamp(min=1)
            if update.add(loss):
                losses.append(loss.item())
                entropies.append(masked_mean(entropy.cpu(), s.response_mask[mb]).item())
        if not update.step():
            return None
        out = {"actor_loss": sum(losses) / len(losses), "entropy": sum(entropies) / len(entropies),
               "return": masked_mean(returns, s.response_mask).item()}
        if rollout.greedy is not None:
            out.update(greedy_score=rollout.greedy.scores.mean().item(),
                       advantage=(s.rewards.sum(-1) - rollout.greedy.rewards.sum(-1)).mean().item())
        return out


@register_algorithm("remax")
class ReMax(CriticFree):
    needs_greedy, estimator = True, "remax"


@register_algorithm("grpo")
class GRPO(CriticFree):
    estimator, min_generations = "grpo", 2


@register_algorithm("rloo")
class RLOO(CriticFree):
    estimator, min_generations = "rloo", 2


@register_algorithm("reinforce_pp")
class ReinforcePP(CriticFree):
    estimator = "reinforce_pp"
