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

--dense_baseline per_token (remax, grpo, rloo) subtracts, at each position t, the baseline
answers' own return-to-go at t instead of their total: ReMax the greedy answer's
sum_{j>=t} g^(j-t) rg_j, GRPO the group's mean return-to-go at t, RLOO the other samples'
mean at t (0 past an answer's end). A late token, whose return-to-go holds little of R,
is then compared with what the baseline answers still earned there rather than with all of
their R: the same expectation (the baseline never depends on the answer it is subtracted
from, except GRPO's mean, as published), less variance under dense rewards. With sparse
rewards and answers of equal length it is the total form exactly (tested).
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
    baseline_rewards: Optional[torch.Tensor] = None  # (B, T') ReMax: the greedy answer's dense rewards
    per_token: bool = False                   # --dense_baseline per_token


def group_sum(values: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: (the sum of `values` (B, ...) over its group, the group's size)."""
    ids, index, size = torch.unique(group, return_inverse=True, return_counts=True)
    total = torch.zeros((len(ids), *values.shape[1:]), dtype=values.dtype).index_add_(0, index, values)
    return total[index], size[index].to(values.dtype)


def aligned(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T') cut or zero-padded on the right to (B, width): position t of another answer."""
    return x[:, :width] if x.shape[1] >= width else torch.nn.functional.pad(x, (0, width - x.shape[1]))


def group_stats(totals: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: (its group's sum, size, unbiased std) of `totals`."""
    total, size = group_sum(totals, group)
    sq, _ = group_sum((totals - total / size) ** 2, group)
    return total, size, (sq / (size - 1).clamp(min=1)).sqrt()


@register_estimator("remax")
def remax(x: EstimatorInputs) -> torch.Tensor:
    if x.per_token:
        r, b = clip_total(x.rewards * x.mask, x.clip), clip_total(x.baseline_rewards, x.clip)
        greedy_to_go = discounted_returns(b, torch.ones_like(b), x.gamma)   # 0 past its EOS: rewards are 0 there
        returns = discounted_returns(r, x.mask, x.gamma) - aligned(greedy_to_go, r.shape[1])
    else:
        returns = discounted_returns(clip_total(baseline_subtracted(x.rewards, x.mask, x.baseline), x.clip),
                                     x.mask, x.gamma)
    return (returns - x.kl_ctl * x.kl) * x.mask


@register_estimator("grpo")
def grpo(x: EstimatorInputs) -> torch.Tensor:
    r = clip_total(x.rewards * x.mask, x.clip)
    total, size, std = group_stats(r.sum(-1), x.group)
    returns = discounted_returns(r, x.mask, x.gamma)
    mean = group_sum(returns, x.group)[0] / size[:, None] if x.per_token else (total / size)[:, None]
    return ((returns - mean) / (std[:, None] + EPS) - x.kl_ctl * x.kl) * x.mask


@register_estimator("rloo")
def rloo(x: EstimatorInputs) -> torch.Tensor:
    r = clip_total(x.rewards * x.mask, x.clip)
    returns = discounted_returns(r, x.mask, x.gamma)
    own = returns if x.per_token else r.sum(-1, keepdim=True)
    group_total, size = group_sum(own, x.group)
    others = (group_total - own) / (size[:, None] - 1).clamp(min=1)
    return (returns - others - x.kl_ctl * x.kl) * x.mask


@register_estimator("reinforce_pp")
def reinforce_pp(x: EstimatorInputs) -> torch.Tensor:
    r = clip_total(x.rewards * x.mask, x.clip) - x.kl_ctl * x.kl
    returns = discounted_returns(r * x.mask, x.mask, x.gamma)
    m = x.mask.bool()
    mean, std = returns[m].mean(), returns[m].std() if m.sum() > 1 else returns.new_tensor(1.0)
    return (returns - mean) / (std + EPS) * x.mask
