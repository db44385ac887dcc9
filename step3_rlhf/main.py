"""Stage 3: RL from the reward models, with per-token rewards (ReMax or PPO).

    deepspeed --num_gpus 2 step3_rlhf/main.py --algo remax --reward_calculator abc \\
        --actor_model_name_or_path output/sft --reward_model_name_or_path output/rm \\
        --data_path imdb --output_dir output/remax_abc
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script

import torch

from common.cli import run_main
from common.config import RLHFConfig, dump_config, parse_config
from common.data.prepare import prepare_tokenized
from common.data.schemas import PROMPT
from common.errors import ConfigError
from common.guard import NonFiniteGuard, inject_nan, poison
from common.loop import TrainingRun
from common.models import EXPORT_DIR, check_kind, load_tokenizer, resolve_model_path
from common.trainer import export_stage, plan_rollout_steps
from common.reward_dropout import dropout_scores, reward_dropout
from common.rewards import get_calculator, needs_of
from common.strategy import DeepSpeedStrategy
from step3_rlhf.algorithms import ALGORITHMS
from step3_rlhf.evaluate import evaluate_policy, load_gold_scorer
from step3_rlhf.models import build_models, encode_prompt, prompt_users


def check(cfg) -> None:
    get_calculator(cfg.reward_calculator)
    needs_of(cfg)
    answers = cfg.per_device_generation_batch_size * cfg.num_generations
    if answers % cfg.per_device_training_batch_size:
        raise ConfigError(f"--per_device_generation_batch_size {cfg.per_device_generation_batch_size} x "
                          f"--num_generations {cfg.num_generations} is not a multiple of "
                          f"--per_device_training_batch_size {cfg.per_device_training_batch_size}")
    algo = ALGORITHMS[cfg.algo]
    if cfg.num_generations < getattr(algo, "min_generations", 1):
        raise ConfigError(f"--algo {cfg.algo} takes its baseline from the other answers to the same prompt: "
                          f"--num_generations must be at least {algo.min_generations}")
    if algo.needs_greedy and cfg.num_generations > 1:
        raise ConfigError(f"--algo {cfg.algo} baselines each answer with the greedy one: --num_generations 1 "
                          "(grpo or rloo use groups of samples)")
    if cfg.dense_baseline == "per_token" and cfg.algo not in ("remax", "grpo", "rloo"):
        raise ConfigError(f"--dense_baseline per_token places remax's, grpo's or rloo's baseline per token; "
                          f"--algo {cfg.algo} has none to place")
    if cfg.min_answer_seq_len > cfg.max_answer_seq_len:
        raise ConfigError(f"--min_answer_seq_len {cfg.min_answer_seq_len} is above "
                          f"--max_answer_seq_len {cfg.max_answer_seq_len}")
    if cfg.enable_ema and cfg.lora_dim > 0:
        raise ConfigError("--enable_ema with --lora_dim: the EMA would average adapters, not the model")


def throughput(times: dict[str, float], samples: int, tokens: int, world: int) -> dict[str, float]:
    """Seconds per phase of the step; samples/s over the whole step and generated tokens/s, all ranks."""
    step = sum(times.values())
    return {**times, "samples_per_s": world * samples / step if step else 0.0,
            "tokens_per_s": world * tokens / times["time_generate"] if times.get("time_generate") else 0.0}


def main(argv=None) -> dict:
    cfg = parse_config(RLHFConfig, argv, description=__doc__)
    check(cfg)
    strategy = DeepSpeedStrategy(cfg)
    strategy.setup_distributed()
    algo_cls = ALGORITHMS[cfg.algo]
    actor_path = resolve_model_path(cfg.actor_model_name_or_path)
    check_kind(actor_path, ("causal_lm",), "--actor_model_name_or_path")
    tokenizer = load_tokenizer(cfg, actor_path)
    train, evaluation, _ = prepare_tokenized(cfg, PROMPT, tokenizer, encode_prompt, stage=3,
                                             strategy=strategy, max_len=cfg.max_prompt_seq_len)
    total = plan_rollout_steps(cfg, len(train), strategy.world_size)
    gold = load_gold_scorer(cfg)
    m = build_models(cfg, strategy, algo_cls, tokenizer, total, prompt_users=prompt_users(cfg, train, evaluation),
                     gold=gold)
    algo = algo_cls(cfg, strategy, m.actor, m.critic)
    engines = {"actor": m.actor, **({"critic": m.critic} if m.critic else {}), **({"ema": m.ema} if m.ema else {})}
    run = TrainingRun(cfg, strategy, engines, f"rlhf-{cfg.algo}", total, len(train),
                      cfg.per_device_generation_batch_size, kl_ctl=cfg.kl_ctl, initial_eval=None)
    if strategy.is_main:
        dump_config(cfg, Path(cfg.output_dir) / "config.yaml")

    def evaluate() -> dict:
        return evaluate_policy(cfg, strategy, m.rollout, m.tokenizer, evaluation, gold)
    initial = run.start(evaluate, f"{cfg.algo}+{cfg.reward_calculator}")
    if initial is not None:  # kept in the checkpoints, so a resumed run still reports it
        run.state["initial_eval"] = initial
    algo.kl_ctl = run.state["kl_ctl"]
    m.rollout.policy_updated(run.step)  # a resumed actor's weights reach the vLLM engine
    # a rollout with a non-finite score, reward or log-prob on any rank is dropped on all of
    # them and the next prompt batch takes its place: `step` counts rollouts trained on
    guard = NonFiniteGuard(strategy, cfg.max_bad_steps, total=run.state["bad_steps"])
    for idx in run.micro_batches():
        guard.step = run.step + 1
        m.rollout.times.take()  # this step's phases only (evaluation also collects)
        rollout = m.rollout.collect([train[i] for i in idx], with_greedy=algo.needs_greedy,
                                    generations=cfg.num_generations)
        s = rollout.sampled
        if inject_nan(guard.step, strategy.rank):
            s.rewards = poison(s.rewards)
        if not guard.finite("reward, score or log-prob", *rollout.numbers()):
            continue
        # reward dropout ranks the whole global batch: every rank computes the same mask
        b = strategy.all_gather_cat(dropout_scores(s.scores, rollout.ref_logprobs, s.response_mask))
        rng = torch.Generator().manual_seed(hash((cfg.seed, run.step)))  # resumable
        n = s.seq.shape[0]  # answers on this rank: prompts x --num_generations
        mine = slice(strategy.rank * n, (strategy.rank + 1) * n)
        weights = reward_dropout(torch.ones(len(b)), b, cfg.reward_dropout, cfg.reward_dropout_rate, rng)[mine]
        with strategy.training(m.actor, m.critic), m.rollout.times.phase("train"):
            metrics = algo.train(rollout, weights, guard)  # checkpointing and dropout act only in train mode
        if metrics is None:  # the update was skipped whole
            continue
        if m.ema is not None:
            strategy.ema_update(m.actor, m.ema, cfg.ema_decay)
        metrics.update(m.rollout.policy_updated(run.step + 1))  # vLLM takes the new weights
        run.state["kl_ctl"], run.state["bad_steps"] = algo.kl_ctl, guard.total
        metrics.update(reward_score=s.scores.mean().item(), bad_steps=guard.total,
                       length=s.response_mask.sum(-1).float().mean().item(), kl=rollout.kl.sum(-1).mean().item(),
                       dense_reward_sum=s.rewards.sum(-1).mean().item(), kept=weights.mean().item(),
                       **throughput(m.rollout.times.take(), n, int(s.response_mask.sum()), strategy.world_size))
        run.end_step(strategy.all_reduce_mean(metrics), evaluate)
    final = evaluate()
    run.end(final)
    out = Path(cfg.output_dir)
    for name, engine in (("", m.actor), ("_ema", m.ema)):
        if engine is not None:
            export_stage(strategy, engine, m.tokenizer, out / f"{EXPORT_DIR}{name}", "causal_lm", f"rlhf-{cfg.algo}")
    return run.close({"reward_calculator": cfg.reward_calculator, "initial_eval": run.state["initial_eval"],
                      "final_eval": final, "export": str(out / EXPORT_DIR)})


if __name__ == "__main__":
    run_main(main, exit_process=True)
