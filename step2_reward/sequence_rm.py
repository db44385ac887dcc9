"""Sequence reward model: a scalar head trained with the Bradley-Terry loss on pairs."""
from __future__ import annotations

import torch

from common.data.batches import pad
from common.data.encode import encode_pair
from common.data.schemas import PAIR
from common.heads import bradley_terry, sequence_scores
from common.trainer import Task, eval_batches, weighted_sum_metrics

SCHEMA, ENCODE, KIND = PAIR, encode_pair, "reward"


def model_class():
    from transformers import AutoModelForSequenceClassification
    return AutoModelForSequenceClassification


MODEL_KWARGS = {"num_labels": 1}


def collate(tokenizer):
    """Chosen then rejected, in one right-padded batch of 2B (one forward per pair)."""
    def fn(rows: list[dict]) -> dict:
        ids, mask = pad([r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows],
                        tokenizer.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask}
    return fn


def pair_scores(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    scores = sequence_scores(engine, batch["input_ids"].to(engine.device),
                             batch["attention_mask"].to(engine.device))
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def build_task(cfg, strategy, tokenizer, evaluation) -> Task:
    batch_fn = collate(tokenizer)

    def loss(engine, batch):
        chosen, rejected = pair_scores(engine, batch)
        return bradley_terry(chosen, rejected).mean(), {
            "accuracy": (chosen > rejected).float().mean().item(),
            "margin": (chosen - rejected).mean().item()}

    def evaluate(engine):
        sums = dict.fromkeys(("accuracy", "chosen_score", "rejected_score", "margin", "loss"), 0.0)
        n = 0.0
        for batch, w in eval_batches(strategy, evaluation, cfg.per_device_eval_batch_size, batch_fn):
            chosen, rejected = (s.cpu() for s in pair_scores(engine, batch))
            sums["accuracy"] += (w * (chosen > rejected).float()).sum().item()
            sums["chosen_score"] += (w * chosen).sum().item()
            sums["rejected_score"] += (w * rejected).sum().item()
            sums["margin"] += (w * (chosen - rejected)).sum().item()
            sums["loss"] += (w * bradley_terry(chosen, rejected)).sum().item()
            n += w.sum().item()
        return weighted_sum_metrics(strategy, sums, dict.fromkeys(sums, n))

    return Task("reward", KIND, batch_fn, loss, evaluate)
