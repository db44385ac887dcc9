"""Per-token reward calculators: the place where dense rewards plug into RL.

A calculator is one registered function `(inputs: RewardInputs, cfg) -> Tensor[B, T]`
over response positions, zero on padding and after the first EOS. It declares what
it reads (`needs`), so the rollout engine computes attention maps or discriminator
probabilities only when some calculator asks. The RL algorithm adds the KL penalty.

Adding one: write the function, decorate it with `@register("name", needs=...)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from common.errors import ConfigError
from common.heads import last_token_index


@dataclass
class RewardInputs:
    """What calculators may read; optional fields are filled only when a calculator needs them."""
    mask: torch.Tensor                              # (B, T) 1 on response tokens up to and incl. EOS
    scores: torch.Tensor                            # (B,) sequence reward R(x, y)
    rm_attention: Optional[torch.Tensor] = None     # (B, T) reward model's last-row attention, policy tokens
    policy_attention: Optional[torch.Tensor] = None  # (B, T) generator_attention_credit of the actor (ABC-D)
    token_rewards: Optional[torch.Tensor] = None    # (B, T) discriminator 2p-1 (TLCR)
    gold_credit: Optional[torch.Tensor] = None      # (B, T) the gold scorer's logit share per token (oracle)


@dataclass(frozen=True)
class Calculator:
    fn: Callable[[RewardInputs, object], torch.Tensor]
    needs: frozenset
    total_is_score: bool = False  # sum_t r_t = R always, so a baseline needs only R


REGISTRY: dict[str, Calculator] = {}


def register(name: str, needs: tuple[str, ...] = (), total_is_score: bool = False):
    def wrap(fn):
        REGISTRY[name] = Calculator(fn, frozenset(needs), total_is_score)
        return fn
    return wrap


def get_calculator(name: str) -> Calculator:
    if name not in REGISTRY:
        raise ConfigError(f"--reward_calculator {name!r}: choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def needs_of(cfg) -> frozenset:
    """Everything the configured calculator (and a composite's parts) reads."""
    if cfg.reward_calculator == "composite":
        return frozenset().union(*(get_calculator(n).needs for n, _ in composite_parts(cfg)))
    return get_calculator(cfg.reward_calculator).needs


def compute_rewards(inputs: RewardInputs, cfg) -> torch.Tensor:
    rewards = get_calculator(cfg.reward_calculator).fn(inputs, cfg)
    return rewards * inputs.mask  # the contract: nothing on padding or after EOS


def at_last(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[torch.arange(mask.shape[0]), last_token_index(mask)] = values.float()
    return out * (mask.sum(-1, keepdim=True) > 0)


def normalised(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of non-negative weights on response tokens summing to 1 (uniform if all zero)."""
    w = weights.float().clamp(min=0) * mask
    total = w.sum(-1, keepdim=True)
    uniform = mask.float() / mask.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, w / total.clamp(min=1e-30), uniform)


@register("sparse", total_is_score=True)
def sparse(inputs: RewardInputs, cfg) -> torch.Tensor:
    """R on the last response token: plain RLHF."""
    return at_last(inputs.mask, inputs.scores)


@register("uniform", total_is_score=True)
def uniform(inputs: RewardInputs, cfg) -> torch.Tensor:
    """R / n on every response token."""
    m = inputs.mask.float()
    return m * (inputs.scores.float() / m.sum(-1).clamp(min=1))[:, None]


def attention_credit(alpha: torch.Tensor, inputs: RewardInputs, beta: float) -> torch.Tensor:
    """beta * alpha_t * R + (1 - beta) * R * [t = n]: potential-based shaping, sum stays R."""
    alpha = normalised(alpha, inputs.mask)
    return beta * alpha * inputs.scores.float()[:, None] + (1 - beta) * at_last(inputs.mask, inputs.scores)


@register("abc", needs=("rm_attention",), total_is_score=True)
def abc(inputs: RewardInputs, cfg) -> torch.Tensor:
    """ABC: the reward model's last-layer attention from its scoring token redistributes R."""
    return attention_credit(inputs.rm_attention, inputs, cfg.abc_beta)


def generator_attention_credit(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ABC-D's alpha from the policy's attention while it generated (before normalising).

    rows[b, j, i]: the last layer's head-mean attention of the step that generated response
    token j to response key i (zero for i >= j). As in the authors' code
    (`get_generator_attention_distribution`): the attention paid to y_i is credited to
    y_{i+1} (y_1 gets 0), and each credit is the MEAN over the steps that saw y_i, not the
    sum, which would favour early tokens (more steps see them). Steps and keys past the
    response (mask 0) take no part.
    """
    valid = mask.float()
    t = mask.shape[1]
    saw = torch.ones(t, t).tril(-1)[None] * valid[:, :, None] * valid[:, None, :]   # step j saw key i < j
    per_key = (rows.float() * saw).sum(1) / saw.sum(1).clamp(min=1)                # (B, keys)
    credit = torch.zeros_like(per_key)
    credit[:, 1:] = per_key[:, :-1]
    return credit * valid


@register("abc_d", needs=("policy_attention",), total_is_score=True)
def abc_d(inputs: RewardInputs, cfg) -> torch.Tensor:
    """ABC-D: the same, with the policy's own attention over its response."""
    return attention_credit(inputs.policy_attention, inputs, cfg.abc_beta)


@register("tlcr", needs=("token_rewards",))
def tlcr(inputs: RewardInputs, cfg) -> torch.Tensor:
    """TLCR: 2 p(positive) - 1 per token, optionally plus R on the last token."""
    r = inputs.token_rewards.float() * inputs.mask
    if cfg.tlcr_add_sequence_reward:
        r = r + at_last(inputs.mask, inputs.scores)
    return r


@register("oracle", needs=("gold_credit",), total_is_score=True)
def oracle(inputs: RewardInputs, cfg) -> torch.Tensor:
    """Positive control for experiments: each token gets the gold scorer's exact share of its
    logit (common/oracle.py), and what R holds beyond those shares sits on the last token, so
    sum_t r_t = R. Where the reward model has learned the gold scorer no credit method can know
    more: if this cannot beat sparse in a setting, nothing can."""
    credit = inputs.gold_credit.float() * inputs.mask
    return credit + at_last(inputs.mask, inputs.scores.float() - credit.sum(-1))


@register("oracle_abc", needs=("gold_credit",), total_is_score=True)
def oracle_abc(inputs: RewardInputs, cfg) -> torch.Tensor:
    """Ablation for experiments: ABC's form with the oracle's |credit| as its attention. It asks
    whether ABC could win with a perfect attention map: its credit keeps R's sign on every token
    (alpha >= 0), where the oracle's rewards good words and penalises bad ones in one answer."""
    return attention_credit(inputs.gold_credit.float().abs(), inputs, cfg.abc_beta)


def composite_parts(cfg) -> list[tuple[str, float]]:
    """'abc:0.5,tlcr:0.5' -> [('abc', 0.5), ('tlcr', 0.5)]."""
    parts = []
    for item in cfg.composite_weights.split(","):
        name, _, weight = item.partition(":")
        try:
            parts.append((name.strip(), float(weight)))
        except ValueError:
            raise ConfigError(f"--composite_weights {cfg.composite_weights!r}: expected NAME:WEIGHT,...") from None
        if name.strip() not in REGISTRY or name.strip() == "composite":
            raise ConfigError(f"--composite_weights: unknown calculator {name.strip()!r}")
    return parts


@register("composite")
def composite(inputs: RewardInputs, cfg) -> torch.Tensor:
    """A weighted sum of other calculators (--composite_weights abc:0.5,tlcr:0.5)."""
    return sum(w * REGISTRY[name].fn(inputs, cfg) for name, w in composite_parts(cfg))
