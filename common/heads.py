"""Reward heads on causal-LM backbones, read the way densehf needs them.

The models are plain transformers classes (`*ForSequenceClassification` with one label
for rewards and PPO values, `*ForTokenClassification` with two bias-free labels for the
TLCR discriminator), so their exports load in any tool. What densehf adds is *where*
they are read: at the last real token by the attention mask (never by comparing ids to
pad_token_id, which fails when pad == eos, as with Llama), with position ids from the
mask so left and right padding give the same numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.token_labels import IGNORE, NEGATIVE, NEUTRAL, POSITIVE


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position per row (works for left and right padding)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.long()).argmax(-1)


def response_log_softmax(engine, seq: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """log pi(. | x, y_<t) at the positions that predict the last `width` tokens: (B, width, V)."""
    device = engine.device
    logits = engine(input_ids=seq.to(device), attention_mask=mask.to(device),
                    position_ids=position_ids(mask).to(device), use_cache=False).logits
    return F.log_softmax(logits[:, -width - 1:-1].float(), -1)


def response_logprobs(engine, seq: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """log pi(y_t | x, y_<t) for the last `width` tokens of `seq`: (B, width)."""
    logp = response_log_softmax(engine, seq, mask, width)
    return logp.gather(2, seq[:, -width:, None].to(logp.device)).squeeze(-1)


def backbone_module(model):
    """The transformer under a PEFT wrapper or a *For* head model (LoRA layers stay in place)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix, model)


def backbone_hidden(model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states of a *ForSequence/TokenClassification model's backbone."""
    out = backbone_module(model)(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask),
                   use_cache=False)
    return out.last_hidden_state


def sequence_scores(model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward (or value) per sequence, read at its last real token: shape (B,)."""
    values = token_values(model, input_ids, mask)
    return values.gather(1, last_token_index(mask)[:, None]).squeeze(1)


def token_values(model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at every position: shape (B, T) (PPO's critic reads this)."""
    hidden = backbone_hidden(model, input_ids, mask)
    return model.score(hidden).squeeze(-1).float()


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(R_c - R_r), per pair."""
    return -F.logsigmoid(chosen - rejected)


# ---- TLCR token discriminator ----------------------------------------------------------
def token_logits(model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, 2) logits of the discriminator: index 0 negative, 1 positive."""
    return model.score(backbone_hidden(model, input_ids, mask)).float()


SOFT_TARGETS = {POSITIVE: (0.0, 1.0), NEGATIVE: (1.0, 0.0), NEUTRAL: (0.5, 0.5)}


def soft_targets(labels: torch.Tensor) -> torch.Tensor:
    """Label ids -> (B, T, 2) target distributions (zeros where ignored)."""
    table = torch.zeros(3, 2)
    for label, target in SOFT_TARGETS.items():
        table[label] = torch.tensor(target)
    return table.to(labels.device)[labels.clamp(min=0)] * (labels != IGNORE)[..., None]


def soft_target_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to soft targets: mean over each sequence's labelled tokens, then over sequences."""
    per_token = -(soft_targets(labels) * F.log_softmax(logits, -1)).sum(-1)
    labelled = (labels != IGNORE).float()
    per_seq = (per_token * labelled).sum(-1) / labelled.sum(-1).clamp(min=1)
    has_labels = labelled.sum(-1) > 0
    return per_seq[has_labels].mean() if has_labels.any() else logits.sum() * 0.0


def token_rewards(logits: torch.Tensor) -> torch.Tensor:
    """TLCR's r_t = 2 p(positive) - 1 from ONE softmax (the released code applies two)."""
    return 2.0 * torch.softmax(logits.float(), -1)[..., POSITIVE] - 1.0
