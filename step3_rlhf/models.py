"""Building stage 3's models, each with its own ZeRO stage and offload setting."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from common.data.encode import prompt_ids, render_prompt
from common.errors import ConfigError, DataError
from common.logger import log
from common.models import check_kind, load_model, load_tokenizer, resolve_model_path
from common.rewards import needs_of
from common.tokenmap import same_tokenizer
from common.vpl import check_backbone, context_backbone_path, load_head, read_context, read_user_contexts
from step3_rlhf.rollout import RolloutEngine
from step3_rlhf.scoring import DiscriminatorScorer, GoldRewardScorer, RewardScorer, VPLScorer


def encode_prompt(tokenizer, row: dict, max_len: int, prompt_format: str, too_long: str) -> Optional[dict]:
    """A prompt keeps its text (scorers with other tokenizers re-tokenise it) and its ids; a conversation's
    text is its chat-template render, generation prompt included."""
    ids = prompt_ids(tokenizer, row["prompt"], prompt_format)
    if len(ids) > max_len:
        if too_long == "skip":
            return None
        ids = ids[-max_len:]
    text = render_prompt(tokenizer, row["prompt"], "raw")  # text as stored, a conversation rendered
    # every row carries `user` (None when absent) so that the table keeps the column
    return {"prompt": text, "input_ids": ids, "user": None if row.get("user") is None else str(row["user"])}


def prompt_users(cfg, *tables) -> frozenset:
    """The users the prompts name: only a VPL reward reads them."""
    if cfg.reward_model_type != "vpl":
        return frozenset()
    return frozenset(u for t in tables if "user" in t.column_names for u in t["user"] if u is not None)


@dataclass
class Models:
    tokenizer: object
    actor: object
    reference: object
    rollout: RolloutEngine
    critic: Optional[object] = None
    ema: Optional[object] = None


def build_models(cfg, strategy, algo_cls, tokenizer, total_steps: int,
                 prompt_users: frozenset = frozenset(), gold=None) -> Models:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification
    needs = needs_of(cfg)
    actor_path = resolve_model_path(cfg.actor_model_name_or_path)
    if cfg.reward_model_type != "sequence":
        check_scorer_without_model(cfg, needs, algo_cls)
    if cfg.reward_model_type == "gold" and gold is None:
        raise ConfigError("--reward_model_type gold rewards with the task's gold scorer: it needs the embedded "
                          "imdb task or --gold_scorer FILE")
    reward_path = None
    if cfg.reward_model_type != "gold":
        reward_path = resolve_model_path(cfg.reward_model_name_or_path)
        check_kind(reward_path, (cfg.reward_model_type if cfg.reward_model_type == "vpl" else "reward",),
                   "--reward_model_name_or_path")
    steps_per_rollout = cfg.per_device_generation_batch_size * cfg.num_generations // cfg.per_device_training_batch_size
    total_updates = total_steps * (steps_per_rollout * cfg.ppo_epochs if algo_cls.needs_critic else 1)
    hybrid = _hybrid_engine(cfg)
    # a VPL reward's refusals and its users' contexts are checked before any model loads
    contexts = check_vpl(cfg, prompt_users) if cfg.reward_model_type == "vpl" else None
    if "gold_credit" in needs and gold is None:
        raise ConfigError(f"--reward_calculator {cfg.reward_calculator} splits R by the gold scorer's word "
                          "contributions: it needs the embedded imdb task or --gold_scorer FILE")

    actor = strategy.prepare(load_model(cfg, strategy, AutoModelForCausalLM, actor_path, cfg.actor_zero_stage),
                             total_updates, cfg.actor_learning_rate, cfg.actor_zero_stage, cfg.offload,
                             micro_batch=cfg.per_device_training_batch_size, extra=hybrid)
    reference = _frozen(cfg, strategy, AutoModelForCausalLM, actor_path, cfg.reference_zero_stage,
                        cfg.offload_reference_model)
    if cfg.reward_model_type == "vpl":
        reward_scorer = _vpl_scorer(cfg, strategy, reward_path, tokenizer, *contexts)
    elif cfg.reward_model_type == "gold":
        reward_scorer = GoldRewardScorer(gold, tokenizer)
    else:
        reward = _frozen(cfg, strategy, AutoModelForSequenceClassification, reward_path, cfg.reward_zero_stage,
                         cfg.offload_reward_model)
        reward_scorer = RewardScorer(reward, load_tokenizer(cfg, reward_path), tokenizer, cfg.prompt_format,
                                     want_attention="rm_attention" in needs, attention_layer=cfg.abc_attention_layer)
    discriminator = None
    if "token_rewards" in needs:
        if not cfg.discriminator_model_name_or_path:
            raise ConfigError(f"--reward_calculator {cfg.reward_calculator} needs "
                              "--discriminator_model_name_or_path (a stage-2 --model_type token output)")
        disc_path = resolve_model_path(cfg.discriminator_model_name_or_path)
        check_kind(disc_path, ("token",), "--discriminator_model_name_or_path")
        disc = _frozen(cfg, strategy, AutoModelForTokenClassification, disc_path, cfg.reward_zero_stage,
                       cfg.offload_reward_model)
        discriminator = DiscriminatorScorer(disc, load_tokenizer(cfg, disc_path), tokenizer, cfg.prompt_format)
    critic = None
    if algo_cls.needs_critic:
        critic_path = _critic_path(cfg, actor_path, tokenizer)
        critic_model = load_model(cfg, strategy, AutoModelForSequenceClassification, critic_path,
                                  cfg.critic_zero_stage, num_labels=1)  # policy: the value head starts fresh
        critic = strategy.prepare(critic_model, total_updates, cfg.critic_learning_rate, cfg.critic_zero_stage,
                                  cfg.offload, micro_batch=cfg.per_device_training_batch_size)
    ema = None
    if cfg.enable_ema:
        ema = _frozen(cfg, strategy, AutoModelForCausalLM, actor_path, cfg.actor_zero_stage, False)
    for engine in (actor, critic):  # eval mode outside updates (strategy.training): generation keeps its cache
        if engine is not None:
            engine.eval()
    rollout = RolloutEngine(cfg, strategy, tokenizer, actor, reference, reward_scorer, discriminator,
                            critic, needs, gold)
    return Models(tokenizer, actor, reference, rollout, critic, ema)


def _critic_path(cfg, actor_path: str, tokenizer) -> str:
    """Where the PPO critic starts: the SFT policy (--critic_init policy) or a reward model."""
    if cfg.critic_init == "policy":
        if cfg.critic_model_name_or_path:
            raise ConfigError("--critic_model_name_or_path is read with --critic_init reward only; "
                              "--critic_init policy starts the critic from the actor")
        return actor_path
    path = resolve_model_path(cfg.critic_model_name_or_path or cfg.reward_model_name_or_path)
    check_kind(path, ("reward",), "--critic_model_name_or_path")
    if not same_tokenizer(load_tokenizer(cfg, path), tokenizer):
        raise ConfigError(f"{path}: the PPO critic must share the actor's tokenizer "
                          "(values are read per actor token)")
    return path


def check_scorer_without_model(cfg, needs: frozenset, algo_cls) -> None:
    """Refusals for a reward that is not a stage-2 sequence model (VPL, gold): it has no attention for
    ABC and nothing to copy into a PPO critic."""
    what = {"vpl": "a VPL reward model", "gold": "the gold scorer"}[cfg.reward_model_type]
    if "rm_attention" in needs:
        raise ConfigError(f"--reward_calculator {cfg.reward_calculator} reads the reward model's attention; "
                          f"{what} has none: use sparse, uniform, abc_d, tlcr or oracle")
    if algo_cls.needs_critic and cfg.critic_init == "reward" and not cfg.critic_model_name_or_path:
        raise ConfigError(f"--algo {cfg.algo} with --reward_model_type {cfg.reward_model_type} needs --critic_init "
                          f"policy or --critic_model_name_or_path (a stage-2 sequence reward model): {what} "
                          "cannot initialise a critic")


def check_vpl(cfg, prompt_users: frozenset) -> tuple[list, dict]:
    """(--vpl_user's context pairs, those of each user a prompt names), or a clear refusal."""
    context = read_context(cfg.vpl_context_path, cfg.vpl_user)
    per_user = read_user_contexts(cfg.vpl_context_path)
    if missing := sorted(prompt_users - set(per_user)):
        raise DataError(f"{','.join(cfg.data_path)}: field 'user'",
                        f"prompt users {', '.join(map(repr, missing))} have no pairs in --vpl_context_path "
                        f"{cfg.vpl_context_path} (users there: {', '.join(per_user) or 'none'})")
    return context, {u: c for u, c in per_user.items() if u in prompt_users}


def _vpl_scorer(cfg, strategy, path: str, policy_tokenizer, context: list, per_user: dict) -> VPLScorer:
    """The personalised reward of --vpl_user, or of the user a prompt names, from a stage-2
    --model_type vpl export."""
    from transformers import AutoModel
    head = load_head(path)
    engines = {p: _frozen(cfg, strategy, AutoModel, p, cfg.reward_zero_stage, cfg.offload_reward_model)
               for p in dict.fromkeys((path, context_backbone_path(path)))}
    for p, engine in engines.items():
        check_backbone(head, strategy.module(engine).config.hidden_size, p)
    scorer = VPLScorer(engines[path], head, load_tokenizer(cfg, path), policy_tokenizer, cfg.prompt_format)
    scorer.set_users(strategy, engines[context_backbone_path(path)], context, per_user)
    log.info("VPL reward: the z of %s for prompts naming no user%s", repr(cfg.vpl_user) if cfg.vpl_user else
             "all context rows", f"; per-prompt users: {', '.join(sorted(per_user))}" if per_user else "")
    return scorer


def _frozen(cfg, strategy, model_class, path, zero_stage, offload):
    model = load_model(cfg, strategy, model_class, path, zero_stage, train=False)
    return strategy.prepare_frozen(model, zero_stage, offload)


def _hybrid_engine(cfg) -> Optional[dict]:
    """DeepSpeed's hybrid engine (fast generation with training layouts): GPUs only."""
    if not cfg.enable_hybrid_engine:
        return None
    if not torch.cuda.is_available():
        log.warning("--enable_hybrid_engine: the hybrid engine has no CPU kernels; "
                    "generating with the plain path instead")
        return None
    return {"hybrid_engine": {"enabled": True, "max_out_tokens": cfg.max_prompt_seq_len + cfg.max_answer_seq_len,
                              "inference_tp_size": 1, "release_inference_cache": False,
                              "pin_parameters": True, "tp_gather_partition_size": 8}}
