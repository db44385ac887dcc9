"""Rollouts: generate, score and compute per-token rewards for a batch of prompts.

Sequences are [left-padded prompt | right-padded response]. A response runs up to and
including its first EOS; everything after is masked, so it earns no reward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from common.attention import LayerAttention
from common.data.batches import pad
from common.heads import response_logprobs, token_values
from common.logger import PhaseTimes
from common.models import resolve_model_path
from common.oracle import gold_token_credit
from common.rewards import RewardInputs, at_last, compute_rewards, generator_attention_credit, get_calculator
from common.strategy import DeepSpeedStrategy


@dataclass
class Responses:
    seq: torch.Tensor          # (B, P + T) prompt and response ids
    mask: torch.Tensor         # (B, P + T) attention mask
    response_mask: torch.Tensor  # (B, T)
    scores: torch.Tensor       # (B,) reward-model score
    rewards: torch.Tensor      # (B, T) the calculator's per-token rewards


@dataclass
class Rollout:
    prompts: list[str]
    prompt_width: int
    sampled: Responses
    actor_logprobs: torch.Tensor            # (B, T) under the policy that generated
    ref_logprobs: torch.Tensor              # (B, T)
    greedy: Optional[Responses] = None      # ReMax baseline
    values: Optional[torch.Tensor] = None   # (B, T) PPO critic
    group: Optional[torch.Tensor] = None    # (B,) the prompt each answer is to (--num_generations per prompt)

    @property
    def kl(self) -> torch.Tensor:
        """log pi_old - log pi_ref per response token (0 on padding): the one KL estimate every loss,
        metric and controller reads."""
        return self.actor_logprobs - self.ref_logprobs

    def numbers(self) -> list[Optional[torch.Tensor]]:
        """Every tensor the update is computed from (what the non-finite guard checks)."""
        out = [self.sampled.scores, self.sampled.rewards, self.actor_logprobs, self.ref_logprobs, self.values]
        return out + ([self.greedy.scores, self.greedy.rewards] if self.greedy is not None else [])


def response_mask(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it."""
    is_eos = (response == eos_id).long()
    after_first_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_first_eos).long()


class RolloutEngine:
    vllm = None  # with --rollout_engine vllm: a colocated VLLMRollouts (step3_rlhf/vllm_engine.py)
    step = 0     # optimizer steps taken: vLLM's per-request sampling seeds derive from it

    def __init__(self, cfg, strategy, tokenizer, actor, reference, reward_scorer,
                 discriminator=None, critic=None, needs: frozenset = frozenset(), gold=None):
        self.cfg, self.strategy, self.tokenizer, self.gold = cfg, strategy, tokenizer, gold
        self.actor, self.reference, self.critic = actor, reference, critic
        self.reward_scorer, self.discriminator = reward_scorer, discriminator
        self.needs = needs
        self.times = PhaseTimes(strategy.synchronize if strategy is not None else None)
        self.actor_attention = LayerAttention(DeepSpeedStrategy.module(actor)) if "policy_attention" in needs else None
        if getattr(cfg, "rollout_engine", "hf") == "vllm":
            from step3_rlhf.vllm_engine import VLLMRollouts
            self.vllm = VLLMRollouts(cfg, strategy, tokenizer, resolve_model_path(cfg.actor_model_name_or_path))

    def policy_updated(self, step: int) -> dict:
        """The actor's weights changed (an optimizer step, a resume): the vLLM engine takes them.
        Returns the metrics of --vllm_check_steps' check, when one is due."""
        self.step = step
        if self.vllm is None:
            return {}
        with self.times.phase("weight_sync"):
            self.vllm.load_weights(self.actor)
        return self.vllm.check(self.hf_generate, step)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, greedy: bool):
        if self.vllm is not None:
            sampled, best = self.vllm.generate(prompt_ids, prompt_mask, self.step, sampled=not greedy, greedy=greedy)
            return best if greedy else sampled
        return self.hf_generate(prompt_ids, prompt_mask, greedy)

    @torch.no_grad()
    def hf_generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, greedy: bool):
        cfg, tok = self.cfg, self.tokenizer
        kwargs = dict(max_new_tokens=cfg.max_answer_seq_len, min_new_tokens=cfg.min_answer_seq_len,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
        if greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, top_p=cfg.top_p, temperature=cfg.temperature, top_k=0)
        return self.strategy.generate(self.actor, prompt_ids, prompt_mask, **kwargs)

    @torch.no_grad()
    def collect(self, rows: list[dict], with_greedy: bool, generations: int = 1) -> Rollout:
        """Generate, score and reward `generations` answers per row (one generate call), in row order."""
        group = torch.arange(len(rows)).repeat_interleave(generations)
        rows = [r for r in rows for _ in range(generations)]
        prompts = [r["prompt"] for r in rows]
        users = [r.get("user") for r in rows]  # a personalised (VPL) reward scores each for its user
        policy_prompts = [r["input_ids"] for r in rows]
        prompt_seq, prompt_mask = pad(policy_prompts, self.tokenizer.pad_token_id, side="left")
        width = prompt_seq.shape[1]
        with self.times.phase("generate"):
            if self.vllm is not None:  # one call: n samples per prompt, and the greedy baseline
                sampled_seq, greedy_seq = self.vllm.generate(prompt_seq, prompt_mask, self.step, greedy=with_greedy,
                                                             n=generations)
            else:
                sampled_seq = self.generate(prompt_seq, prompt_mask, greedy=False)
                greedy_seq = self.generate(prompt_seq, prompt_mask, greedy=True) if with_greedy else None
        sampled, logprobs = self._evaluate(prompts, policy_prompts, sampled_seq, prompt_mask, width, True, users)
        t = sampled.response_mask.shape[1]
        with self.times.phase("forward"):
            ref = response_logprobs(self.reference, sampled.seq, sampled.mask, t).cpu()
        greedy = None
        if greedy_seq is not None:
            # the total baseline reads only the greedy total: when that is R, skip the calculator's inputs
            # (for ABC-D an extra actor forward over the greedy responses); per_token reads its dense rewards
            total_only = (get_calculator(self.cfg.reward_calculator).total_is_score
                          and self.cfg.dense_baseline == "total")
            greedy, _ = self._evaluate(prompts, policy_prompts, greedy_seq, prompt_mask, width, False, users,
                                       total_only=total_only)
        values = None
        if self.critic is not None:
            with self.times.phase("forward"):
                v = token_values(self.critic, sampled.seq.to(self.critic.device),
                                 sampled.mask.to(self.critic.device))
            values = v[:, -t - 1:-1].cpu() * sampled.response_mask
        return Rollout(prompts, width, sampled, logprobs * sampled.response_mask,
                       ref * sampled.response_mask, greedy, values, group)

    def _evaluate(self, prompts, policy_prompts, seq, prompt_mask, width, need_logprobs: bool, users: list,
                  total_only: bool = False):
        """Mask, score and reward one set of responses; the actor's log-probs if asked."""
        response = seq[:, width:]
        if response.shape[1] == 0:  # nothing generated at all: keep one (EOS) slot
            response = torch.full((seq.shape[0], 1), self.tokenizer.eos_token_id)
            seq = torch.cat([seq, response], 1)
        r_mask = response_mask(response, self.tokenizer.eos_token_id)
        mask = torch.cat([prompt_mask, r_mask], 1)
        t = r_mask.shape[1]
        logprobs, policy_attention = None, None
        with self.times.phase("forward"):
            if self.actor_attention is not None and not total_only:  # ABC-D: the log-prob forward yields attention
                with self.actor_attention.capture():
                    logprobs = response_logprobs(self.actor, seq, mask, t).cpu()
                policy_attention = self._policy_attention(mask, r_mask, width)
            elif need_logprobs:
                logprobs = response_logprobs(self.actor, seq, mask, t).cpu()
        with self.times.phase("scoring"):
            lists = [r[m.bool()].tolist() for r, m in zip(response, r_mask)]
            personal = {"users": users} if getattr(self.reward_scorer, "per_user", False) else {}
            scores, rm_attention = self.reward_scorer(prompts, policy_prompts, lists, t, **personal)
            token_rewards = None
            if "token_rewards" in self.needs:
                token_rewards = self.discriminator(prompts, policy_prompts, lists, t)
            if total_only:
                return Responses(seq, mask, r_mask, scores, at_last(r_mask, scores)), logprobs
            gold_credit = None
            if "gold_credit" in self.needs:  # the oracle positive control (experiments)
                gold_credit = gold_token_credit(self.gold, self.tokenizer, prompts, lists, t)
            inputs = RewardInputs(r_mask, scores, rm_attention, policy_attention, token_rewards, gold_credit)
            return Responses(seq, mask, r_mask, scores, compute_rewards(inputs, self.cfg)), logprobs

    def _policy_attention(self, mask: torch.Tensor, r_mask: torch.Tensor, width: int) -> torch.Tensor:
        """ABC-D credit from the last-layer attention of each generating step to the response.

        The step that generates y_j queries from position width - 1 + j (0-based j); a causal
        forward over the finished sequence gives the same rows as generation did.
        """
        b, t = r_mask.shape
        device = self.actor.device
        queries = torch.arange(width - 1, width - 1 + t)[None].expand(b, -1)
        rows = self.actor_attention.rows(mask.to(device), queries.to(device))
        return generator_attention_credit(rows[:, :, width:].cpu(), r_mask)   # (B, steps, response keys)
