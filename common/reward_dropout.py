"""Reward dropout (Lee and Lim, 2024): keep the policy gradient of a few samples only.

A batch transform on per-sample weights, applied to the RL loss of ReMax or PPO:
`quantile` keeps the top (1 - rate) share of samples by b = R + log beta(y) (beta: mean
token probability under the reference); `random` zeroes a `rate` share at random.
"""
from __future__ import annotations

from typing import Optional

import torch

MODES = ("none", "random", "quantile")


def dropout_scores(scores: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """b_i = R_i + log(mean_t pi_ref(y_t)) over each response."""
    m = mask.float()
    probs = (ref_logprobs.float().exp() * m).sum(-1) / m.sum(-1).clamp(min=1)
    return scores.float() + probs.clamp(min=1e-30).log()


def reward_dropout(weights: torch.Tensor, scores: torch.Tensor, mode: str, rate: float,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample weights with the dropped samples zeroed."""
    if mode == "none" or rate <= 0:
        return weights
    n = scores.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if mode == "quantile":
        k = max(1, min(n, round((1.0 - rate) * n)))
        keep[torch.topk(scores.float(), k).indices] = True
    elif mode == "random":
        keep = torch.rand(n, generator=generator).to(scores.device) >= rate
    else:
        raise ValueError(f"reward dropout mode {mode!r} not in {MODES}")
    return weights * keep.to(weights.dtype)

