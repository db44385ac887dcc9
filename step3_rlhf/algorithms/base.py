"""Registry and the small tensor helpers the algorithms share."""
from __future__ import annotations

import torch

from common.heads import response_log_softmax
from common.rewards import at_last

ALGORITHMS: dict[str, type] = {}


def register_algorithm(name: str):
    def wrap(cls):
        ALGORITHMS[name] = cls
        return cls
    return wrap


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_i = sum_{j >= i} gamma^(j - i) r_j over each response."""
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def clip_total(rewards: torch.Tensor, limit: float) -> torch.Tensor:
    """Scale each row so its total lies in [-limit, limit] (the sequence-reward clip, kept dense)."""
    total = rewards.sum(-1)
    clipped = total.clamp(-limit, limit)
    scale = torch.where(total.abs() > limit, clipped / total, torch.ones_like(total))
    return rewards * scale[:, None]


def baseline_subtracted(rewards: torch.Tensor, mask: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Dense rewards minus a per-sample baseline placed on the last token: total becomes R - b."""
    return rewards - at_last(mask, baseline)


def policy_logprobs(engine, seq: torch.Tensor, mask: torch.Tensor, width: int):
    """(log-probs of the response tokens, entropy per response position) with gradients."""
    logp_all = response_log_softmax(engine, seq, mask, width)
    logp = logp_all.gather(2, seq[:, -width:, None].to(logp_all.device)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy.detach()


def micro_batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))
