"""Held-out evaluation of the policy: reward-model score, gold reward, KL, log-likelihood under the
reference, length, samples."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from common.logger import log
from common.trainer import eval_batches, weighted_sum_metrics


def load_gold_scorer(cfg):
    """The task's own scorer (not the learned reward model), when there is one."""
    if cfg.gold_scorer == "none":
        return None
    from common.gold import GoldScorer
    if cfg.gold_scorer == "auto":
        if "imdb" not in cfg.data_path:
            return None
        from common.presets import gold_scorer_path
        return GoldScorer.load(gold_scorer_path())
    return GoldScorer.load(Path(cfg.gold_scorer))


@torch.no_grad()
def evaluate_policy(cfg, strategy, engine, tokenizer, rows: list[dict], gold: Optional[object]) -> dict:
    """Sample responses for `rows` (every rank its share, same count) and average the metrics.

    The global RNG is forked, so evaluating does not change the training run's samples.
    """
    sums = dict.fromkeys(("reward_score", "kl", "ref_logprob", "length"), 0.0)
    if gold is not None:
        sums["gold_reward"] = 0.0
    n, shown = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        for batch, w in eval_batches(strategy, rows, cfg.per_device_generation_batch_size, list):
            rollout = engine.collect(batch, with_greedy=False)
            s = rollout.sampled
            sums["reward_score"] += (w * s.scores).sum().item()
            sums["kl"] += (w * rollout.kl.sum(-1)).sum().item()
            # log pi_ref(y | x) of the whole response: the x-axis of the reward-dropout front
            sums["ref_logprob"] += (w * rollout.ref_logprobs.sum(-1)).sum().item()
            sums["length"] += (w * s.response_mask.sum(-1)).sum().item()
            texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                     for r, m in zip(s.seq[:, rollout.prompt_width:], s.response_mask)]
            if gold is not None:
                g = torch.tensor(gold.logit([p + t for p, t in zip(rollout.prompts, texts)]), dtype=torch.float)
                sums["gold_reward"] += (w * g).sum().item()
            n += w.sum().item()
            if strategy.is_main and shown < cfg.num_eval_samples:
                for p, t, sc in list(zip(rollout.prompts, texts, s.scores.tolist()))[: cfg.num_eval_samples - shown]:
                    log.info("sample | %r -> %r | reward %.3f", p, t, sc)
                    shown += 1
    return weighted_sum_metrics(strategy, sums, dict.fromkeys(sums, n))
