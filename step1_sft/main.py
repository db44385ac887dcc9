"""Stage 1: supervised fine-tuning (causal-LM loss on response tokens; prompts masked).

    deepspeed --num_gpus 2 step1_sft/main.py --model_name_or_path tiny --data_path imdb ...
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script

import torch
import torch.nn.functional as F

from common.cli import run_main
from common.config import SupervisedConfig, parse_config
from common.data.batches import labelled_collate
from common.data.encode import IGNORE, encode_sft
from common.data.prepare import prepare_tokenized
from common.data.schemas import SFT
from common.models import load_model, load_tokenizer
from common.strategy import DeepSpeedStrategy
from common.trainer import Task, eval_batches, fit, plan_steps, weighted_sum_metrics


@dataclass
class SFTConfig(SupervisedConfig):
    """Stage-1 flags: the shared groups, nothing stage-specific needed."""


def token_nll(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed negative log-likelihood of labelled tokens, and their counts."""
    device = engine.device
    logits = engine(input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    mask = (labels != IGNORE).float()
    return (nll * mask).sum(-1), mask.sum(-1)


def main(argv=None) -> dict:
    cfg = parse_config(SFTConfig, argv, description=__doc__)
    strategy = DeepSpeedStrategy(cfg)
    strategy.setup_distributed()
    tokenizer = load_tokenizer(cfg)
    train, evaluation, _ = prepare_tokenized(cfg, SFT, tokenizer, encode_sft, stage=1, strategy=strategy)
    total_steps = plan_steps(cfg, len(train), strategy.world_size)
    from transformers import AutoModelForCausalLM
    model = load_model(cfg, strategy, AutoModelForCausalLM)
    engine = strategy.prepare(model, total_steps)
    batch_fn = labelled_collate(tokenizer.pad_token_id)

    def loss(engine, batch):
        nll, count = token_nll(engine, batch)
        return nll.sum() / count.sum().clamp(min=1), {}

    def evaluate(engine):
        sums, tokens = 0.0, 0.0
        for batch, weights in eval_batches(strategy, evaluation, cfg.per_device_eval_batch_size, batch_fn):
            nll, count = token_nll(engine, batch)
            sums += (nll.cpu() * weights).sum().item()
            tokens += (count.cpu() * weights).sum().item()
        out = weighted_sum_metrics(strategy, {"loss": sums}, {"loss": tokens})
        out["perplexity"] = float(torch.tensor(out["loss"]).exp())
        return out

    task = Task("sft", "causal_lm", batch_fn, loss, evaluate)
    return fit(cfg, strategy, engine, train, task, tokenizer, total_steps)


if __name__ == "__main__":
    run_main(main, exit_process=True)
