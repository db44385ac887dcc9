"""The supervised training loop shared by stage 1 and the stage-2 models.

A stage supplies a `Task`: how to collate rows, the loss of a batch, and an
evaluation. The loop owns everything else: accumulation (common/update.py), the final HF
export, and through `TrainingRun` (common/loop.py, shared with stage 3) the data order,
logging, evaluation and checkpoint cadence, resume and preemption.

A micro-batch whose loss is non-finite on any rank is dropped on every rank before
backward (common/guard.py) and the next one in the data order takes its place: the
step counter counts optimizer updates, so a run still makes `total_steps` of them, and
the data order stays a pure function of the seed, so resume stays exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from common.data.batches import ResumableBatches
from common.errors import ConfigError, DensehfError
from common.guard import NonFiniteGuard, inject_nan, poison
from common.loop import TrainingRun
from common.models import EXPORT_DIR, write_kind
from common.update import Accumulation


@dataclass
class Task:
    name: str                       # stage name recorded in checkpoints ("sft", "reward", ...)
    kind: str                       # what the export is ("causal_lm", "reward", "token")
    collate: Callable[[list[dict]], dict]
    loss: Callable[[object, dict], tuple[torch.Tensor, dict]]  # (engine, batch) -> loss, metrics
    evaluate: Callable[[object], dict]                         # engine -> metrics (collective)


def plan_steps(cfg, n_train: int, world_size: int) -> int:
    """Optimizer steps the run will take (the scheduler needs this up front)."""
    micro_per_epoch = n_train // (cfg.per_device_train_batch_size * world_size)
    if micro_per_epoch < cfg.gradient_accumulation_steps:
        raise DensehfError(f"{n_train} training rows make no full step of "
                           f"{cfg.per_device_train_batch_size} x {world_size} processes x "
                           f"{cfg.gradient_accumulation_steps} accumulation; lower the batch size")
    per_epoch = micro_per_epoch // cfg.gradient_accumulation_steps
    return min(cfg.max_steps, per_epoch * cfg.num_train_epochs) if cfg.max_steps else per_epoch * cfg.num_train_epochs


def plan_rollout_steps(cfg, n_prompts: int, world_size: int) -> int:
    """Stage 3's steps: one per generation batch of every rank."""
    per_epoch = len(ResumableBatches(n_prompts, cfg.per_device_generation_batch_size, 0, world_size, cfg.seed))
    if per_epoch == 0:
        raise ConfigError(f"{n_prompts} prompts make no batch of {cfg.per_device_generation_batch_size} "
                           f"x {world_size} processes")
    return cfg.max_steps or per_epoch * cfg.num_train_epochs


def fit(cfg, strategy, engine, train_rows, task: Task, tokenizer, total_steps: int) -> dict:
    """Train to `total_steps`, evaluating and checkpointing on cadence; export at the end."""
    run = TrainingRun(cfg, strategy, {"model": engine}, task.name, total_steps, len(train_rows),
                      cfg.per_device_train_batch_size)
    run.start(lambda: _evaluate(engine, task), task.name)
    guard = NonFiniteGuard(strategy, cfg.max_bad_steps, total=run.state["bad_steps"])
    update = Accumulation(strategy, engine, guard, cfg.gradient_accumulation_steps)
    window = []
    engine.train()
    for idx in run.micro_batches():
        guard.step = run.step + 1
        loss, metrics = task.loss(engine, task.collate([train_rows[i] for i in idx]))
        if inject_nan(guard.step, strategy.rank):
            loss = poison(loss)
        if not update.add(loss):
            continue
        window.append({"loss": loss.item(), **metrics})
        if not update.full:
            continue
        update.step()
        run.state["bad_steps"] = guard.total
        averaged = strategy.all_reduce_mean(_mean(window))
        averaged.update(lr=strategy.learning_rate(engine), bad_steps=guard.total)
        window = []
        run.end_step(averaged, lambda: _evaluate(engine, task))
    final = _evaluate(engine, task)
    run.end(final)
    export = export_stage(strategy, engine, tokenizer, Path(cfg.output_dir) / EXPORT_DIR, task.kind, task.name)
    return run.close({"train_rows": len(train_rows), "zero_stage": cfg.zero_stage, "final_eval": final,
                      "export": str(export)})


def export_stage(strategy, engine, tokenizer, out_dir: Path, kind: str, stage: str) -> Path:
    """The HF export, marked with what produced it (the next stage checks the kind)."""
    strategy.export_hf(engine, tokenizer, out_dir)
    if strategy.is_main:
        write_kind(out_dir, kind, stage=stage)
    return out_dir


def _evaluate(engine, task: Task) -> dict:
    engine.eval()
    with torch.no_grad():
        metrics = task.evaluate(engine)
    engine.train()
    return metrics


def _mean(window: list[dict]) -> dict:
    keys = window[0].keys()
    return {k: sum(w[k] for w in window) / len(window) for k in keys}


def weighted_sum_metrics(strategy, sums: dict[str, float], counts: dict[str, float]) -> dict:
    """Exact cross-rank means: all-reduce numerators and denominators, then divide."""
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [counts[k] for k in keys], dtype=torch.float64)
    t = strategy.all_reduce_sum(t).cpu()
    n = len(keys)
    return {k: (t[i] / t[n + i]).item() if t[n + i] > 0 else math.nan for i, k in enumerate(keys)}


def eval_batches(strategy, rows, batch_size: int, collate: Callable):
    """Yield (batch, weights) over this rank's share of `rows`; equal counts on every rank."""
    from common.data.batches import eval_shard
    if len(rows) == 0:
        return
    idx, weights = eval_shard(len(rows), strategy.rank, strategy.world_size)
    for i in range(0, len(idx), batch_size):
        yield collate([rows[j] for j in idx[i:i + batch_size]]), torch.tensor(weights[i:i + batch_size])
