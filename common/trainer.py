"""The supervised training loop shared by stage 1 and the stage-2 models.

A stage supplies a `Task`: how to collate rows, the loss of a batch, and an
evaluation. The loop owns everything else: data order, accumulation, logging,
evaluation and checkpoint cadence, resume, and the final HF export.

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

from common.checkpoint import CheckpointManager
from common.data.batches import ResumableBatches
from common.errors import ConfigError, DensehfError
from common.guard import NonFiniteGuard, fault_point, inject_nan, poison
from common.logger import RunLogger, log
from common.models import EXPORT_DIR, write_kind
from common.preemption import PreemptionWatch
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
    from common.data.batches import ResumableBatches
    per_epoch = len(ResumableBatches(n_prompts, cfg.per_device_generation_batch_size, 0, world_size, cfg.seed))
    if per_epoch == 0:
        raise ConfigError(f"{n_prompts} prompts make no batch of {cfg.per_device_generation_batch_size} "
                           f"x {world_size} processes")
    return cfg.max_steps or per_epoch * cfg.num_train_epochs


def fit(cfg, strategy, engine, train_rows, task: Task, tokenizer, total_steps: int) -> dict:
    """Train to `total_steps`, evaluating and checkpointing on cadence; export at the end."""
    gas = cfg.gradient_accumulation_steps
    batches = ResumableBatches(len(train_rows), cfg.per_device_train_batch_size,
                               strategy.rank, strategy.world_size, cfg.seed)
    ckpt = CheckpointManager(strategy, cfg.output_dir, cfg.save_total_limit, stage=task.name)
    logger = RunLogger(cfg, strategy, task.name)
    state = {"step": 0, "epoch": 0, "micro": 0, "bad_steps": 0}
    if cfg.resume:
        loaded = ckpt.load({"model": engine})
        if loaded:
            state.update({k: loaded.get(k, state[k]) for k in state})
            log.info("resumed from step %d (epoch %d, micro-batch %d)", state["step"], state["epoch"], state["micro"])
        else:
            log.info("--resume: no complete checkpoint in %s, starting fresh", ckpt.root)
    if state["step"] == 0:
        logger.step(0, _evaluate(engine, task), prefix="eval")
    logger.progress(total_steps, state["step"], task.name)
    last_saved, window = state["step"], []
    guard = NonFiniteGuard(strategy, cfg.max_bad_steps, total=state["bad_steps"])
    update = Accumulation(strategy, engine, guard, gas)
    engine.train()
    with PreemptionWatch(strategy, cfg.output_dir) as preemption:
        while state["step"] < total_steps:
            for idx in batches.epoch(state["epoch"], start=state["micro"]):
                state["micro"] += 1
                guard.step = state["step"] + 1
                loss, metrics = task.loss(engine, task.collate([train_rows[i] for i in idx]))
                if inject_nan(guard.step, strategy.rank):
                    loss = poison(loss)
                if not update.add(loss):
                    continue
                window.append({"loss": loss.item(), **metrics})
                if not update.full:
                    continue
                update.step()
                state["step"] += 1
                step, state["bad_steps"] = state["step"], guard.total
                averaged = strategy.all_reduce_mean(_mean(window))
                averaged.update(lr=strategy.learning_rate(engine), bad_steps=guard.total)
                logger.step(step, averaged)
                window = []
                if cfg.eval_steps and step % cfg.eval_steps == 0 and step < total_steps:
                    logger.step(step, _evaluate(engine, task), prefix="eval")
                if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                    ckpt.save({"model": engine}, step, state)
                    last_saved = step
                fault_point(step, strategy.rank)
                if step < total_steps:
                    preemption.stop_if_requested(
                        step, None if last_saved == step else lambda: ckpt.save({"model": engine}, step, state),
                        str(ckpt.root))
                if step >= total_steps:
                    break
            else:
                state["epoch"], state["micro"] = state["epoch"] + 1, 0
    final = _evaluate(engine, task)
    logger.step(state["step"], final, prefix="eval")
    if last_saved != state["step"]:
        ckpt.save({"model": engine}, state["step"], state)
    export = export_stage(strategy, engine, tokenizer, Path(cfg.output_dir) / EXPORT_DIR, task.kind, task.name)
    summary = {"stage": task.name, "steps": state["step"], "train_rows": len(train_rows),
               "processes": strategy.world_size, "zero_stage": cfg.zero_stage, "bad_steps": guard.total,
               "damaged_checkpoints": ckpt.damaged,
               "final_eval": final, "export": str(export)}
    logger.summary(summary)
    logger.close()
    return summary


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
