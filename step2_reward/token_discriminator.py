"""TLCR token discriminator: a 2-way bias-free token head trained on soft targets."""
from __future__ import annotations

import torch

from common.data.batches import labelled_collate
from common.data.schemas import REVISION
from common.heads import soft_target_loss, token_logits
from common.token_labels import NEGATIVE, POSITIVE, encode_revision
from common.trainer import Task, eval_batches, weighted_sum_metrics

SCHEMA, ENCODE, KIND = REVISION, encode_revision, "token"
# bias-free head (TLCR), no dropout on it; the export stays a plain *ForTokenClassification
MODEL_KWARGS = {"num_labels": 2, "token_classification_bias": False, "classifier_dropout": 0.0}


def model_class():
    from transformers import AutoModelForTokenClassification
    return AutoModelForTokenClassification


def forward(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    logits = token_logits(engine, batch["input_ids"].to(engine.device),
                          batch["attention_mask"].to(engine.device))
    return logits, batch["labels"].to(logits.device)


def edited_token_stats(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> dict:
    """Weighted sums for accuracy on edited tokens and mean p(positive) per side."""
    p_pos = torch.softmax(logits, -1)[..., POSITIVE]
    w = weights.to(logits.device)[:, None].expand_as(p_pos)
    pos, neg = labels == POSITIVE, labels == NEGATIVE
    correct = (pos & (p_pos > 0.5)) | (neg & (p_pos < 0.5))
    return {"edited_accuracy": ((correct.float() * w)[pos | neg].sum().item(), w[pos | neg].sum().item()),
            "p_positive_revised": ((p_pos * w)[pos].sum().item(), w[pos].sum().item()),
            "p_positive_rejected": ((p_pos * w)[neg].sum().item(), w[neg].sum().item())}


def build_task(cfg, strategy, tokenizer, evaluation) -> Task:
    batch_fn = labelled_collate(tokenizer.pad_token_id)

    def loss(engine, batch):
        logits, labels = forward(engine, batch)
        stats = edited_token_stats(logits.detach(), labels, torch.ones(labels.shape[0]))
        return soft_target_loss(logits, labels), {k: s / max(c, 1) for k, (s, c) in stats.items()}

    def evaluate(engine):
        sums, counts = {}, {}
        losses, n = 0.0, 0.0
        for batch, w in eval_batches(strategy, evaluation, cfg.per_device_eval_batch_size, batch_fn):
            logits, labels = forward(engine, batch)
            for key, (s, c) in edited_token_stats(logits, labels, w).items():
                sums[key], counts[key] = sums.get(key, 0.0) + s, counts.get(key, 0.0) + c
            losses += soft_target_loss(logits, labels).item() * w.sum().item()
            n += w.sum().item()
        sums["loss"], counts["loss"] = losses, n
        return weighted_sum_metrics(strategy, sums, counts)

    return Task("token", KIND, batch_fn, loss, evaluate)
