"""Advantage estimators of the critic-free algorithms: pure functions, registered by name (as verl).

Each maps the dense per-token rewards of a rollout (and what it needs besides) to per-token
returns G that the REINFORCE loss -sum_t G_t log pi(y_t) / sum mask weighs. The token rewards
are kept: G is a return-to-go minus a baseline, so a calculator's credit reaches the tokens;
with `sparse` rewards (R on the last token, gamma 1) each reduces exactly to its published
sequence-level form (tests/test_estimators.py).

    remax         G_t = sum_{j>=t} g^(j-t) a_j - kl*k_t,  a = clip(r - b [t = n]),  b = R(greedy)
                  (Li et al., 2024, ReMax; sparse: clip(R - b))
    grpo          G_t = (sum_{j>=t} g^(j-t) r_j - mean_group(R)) / (std_group(R) + eps) - kl*k_t
                  (Shao et al., 2024, DeepSeekMath; sparse: (R - mean) / std, outcome supervision)
    rloo          G_t = sum_{j>=t} g^(j-t) r_j - mean of the OTHER samples' R - kl*k_t
                  (Ahmadian et al., 2024, Back to Basics; sparse: R_i - mean_{j != i} R_j)
    reinforce_pp  G_t = sum_{j>=t} g^(j-t) (r_j - kl*k_j), normalised over the batch's tokens
                  (Hu, 2025, REINFORCE++: the KL inside the reward, batch-normalised returns)

k_t = log pi_old(y_t) - log pi_ref(y_t); R = sum_t r_t (each row's total clipped to
+-cliprange_reward first, as for PPO). Groups are the k samples of one prompt
(--num_generations k); the group statistics use each group's totals R.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from step3_rlhf.algorithms.base import baseline_subtracted, clip_total, discounted_returns

ESTIMATORS: dict[str, Callable[["EstimatorInputs"], torch.Tensor]] = {}
EPS = 1e-6


def register_estimator(name: str):
    def wrap(fn):
        ESTIMATORS[name] = fn
        return fn
    return wrap


@dataclass
class EstimatorInputs:
    rewards: torch.Tensor                     # (B, T) the calculator's dense rewards
    mask: torch.Tensor                        # (B, T) response tokens
    kl: torch.Tensor                          # (B, T) log pi_old - log pi_ref per token
    group: torch.Tensor                       # (B,) which prompt each sample answers
    kl_ctl: float
    gamma: float
    clip: float                               # the sequence-reward clip
    baseline: Optional[torch.Tensor] = None   # (B,) ReMax: the greedy answer's total reward


def group_stats(totals: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: (its group's sum, size, unbiased std) of `totals`."""
    ids, index, size = torch.unique(group, return_inverse=True, return_counts=True)
    total = torch.zeros(len(ids), dtype=totals.dtype).index_add_(0, index, totals)
    mean = total / size
    sq = torch.zeros(len(ids), dtype=totals.dtype).index_add_(0, index, (totals - mean[index]) ** 2)
    std = (sq / (size - 1).clamp(min=1)).sqrt()
    return total[index], size[index].to(totals.dtype), std[index]


@register_estimator("remax")
def remax(x: EstimatorInputs) -> torch.Tensor:
    advantage = clip_total(baseline_subtracted(x.rewards, x.mask, x.baseline), x.clip)
    return (discounted_returns(advantage, x.mask, x.gamma) - x.kl_ctl * x.kl) * x.mask


@register_estimator("grpo")
def grpo(x: EstimatorInputs) -> torch.Tensor:
    r = clip_total(x.rewards * x.mask, x.clip)
    total, size, std = group_stats(r.sum(-1), x.group)
    returns = discounted_returns(r, x.mask, x.gamma)
    return ((returns - (total / size)[:, None]) / (std[:, None] + EPS) - x.kl_ctl * x.kl) * x.mask


@register_estimator("rloo")
def rloo(x: EstimatorInputs) -> torch.Tensor:
    r = clip_total(x.rewards * x.mask, x.clip)
    totals = r.sum(-1)
    group_total, size, _ = group_stats(totals, x.group)
    others = (group_total - totals) / (size - 1).clamp(min=1)
    return (discounted_returns(r, x.mask, x.gamma) - others[:, None] - x.kl_ctl * x.kl) * x.mask


@register_estimator("reinforce_pp")
def reinforce_pp(x: EstimatorInputs) -> torch.Tensor:
    r = clip_total(x.rewards * x.mask, x.clip) - x.kl_ctl * x.kl
    returns = discounted_returns(r * x.mask, x.mask, x.gamma)
    m = x.mask.bool()
    mean, std = returns[m].mean(), returns[m].std() if m.sum() > 1 else returns.new_tensor(1.0)
    return (returns - mean) / (std + EPS) * x.mask
