"""Scoring rollouts with the reward model (or a personalised VPL one) and the token discriminator.

All may use a tokenizer other than the policy's. Each response is re-tokenised for
the scorer (the same ids when the tokenizers agree), and per-token outputs come back
onto the policy's tokens through a character-overlap map (common/tokenmap.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from common.attention import LayerAttention
from common.data.batches import pad
from common.data.encode import encode_pair, prompt_ids
from common.embeddings import embed_sequences, last_token_hidden
from common.heads import last_token_index, sequence_scores, token_logits, token_rewards
from common.strategy import DeepSpeedStrategy
from common.tokenmap import char_spans, identity_map, overlap_map, same_tokenizer


@dataclass
class ScorerInputs:
    ids: list[list[int]]        # scorer token ids per sample (prompt + response + EOS)
    starts: list[int]           # where each response begins in `ids`
    maps: list[torch.Tensor]    # (scorer response tokens, policy response tokens) overlap maps


class Scorer:
    """Builds a scoring model's inputs from policy rollouts and maps outputs back."""

    def __init__(self, engine, tokenizer, policy_tokenizer, prompt_format: str):
        self.engine, self.tokenizer, self.policy_tokenizer = engine, tokenizer, policy_tokenizer
        self.prompt_format = prompt_format
        self.same = same_tokenizer(tokenizer, policy_tokenizer)

    def inputs(self, prompts: list[str], policy_prompts: list[list[int]],
               responses: list[list[int]]) -> ScorerInputs:
        ids, starts, maps = [], [], []
        eos = self.tokenizer.eos_token_id
        for text, p_ids, resp in zip(prompts, policy_prompts, responses):
            if self.same:
                prompt = list(p_ids)
                body = list(resp) if resp and resp[-1] == eos else list(resp) + [eos]
                m = identity_map(len(body), len(resp))
            else:
                prompt = prompt_ids(self.tokenizer, text, self.prompt_format)
                resp_text = self.policy_tokenizer.decode(resp, skip_special_tokens=True)
                enc = self.tokenizer(resp_text, add_special_tokens=False,
                                     return_offsets_mapping=self.tokenizer.is_fast)
                body = enc["input_ids"] + [eos]
                spans = (list(map(tuple, enc["offset_mapping"])) if self.tokenizer.is_fast
                         else char_spans(self.tokenizer, enc["input_ids"]))
                spans.append((len(resp_text), len(resp_text)))
                m = overlap_map(spans, char_spans(self.policy_tokenizer, resp))
            ids.append(prompt + body)
            starts.append(len(prompt))
            maps.append(m)
        return ScorerInputs(ids, starts, maps)

    def to_policy(self, per_token: torch.Tensor, inp: ScorerInputs, width: int, mean: bool) -> torch.Tensor:
        """Scorer per-token values (B, Ts) -> policy response positions (B, width).

        mean=False shares each value out (sums preserved: attention mass);
        mean=True averages overlapping values (rewards in a fixed range: TLCR).
        """
        out = torch.zeros(len(inp.ids), width)
        for b, (start, m) in enumerate(zip(inp.starts, inp.maps)):
            values = per_token[b, start:start + m.shape[0]].float().cpu()
            moved = values @ m
            if mean:
                moved = moved / m.sum(0).clamp(min=1e-12) * (m.sum(0) > 0)
            out[b, :m.shape[1]] = moved
        return out

    def batch(self, inp: ScorerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad(inp.ids, self.tokenizer.pad_token_id)
        return ids.to(self.engine.device), mask.to(self.engine.device)


class RewardScorer(Scorer):
    def __init__(self, engine, tokenizer, policy_tokenizer, prompt_format: str, want_attention: bool,
                 attention_layer: int = -1):
        super().__init__(engine, tokenizer, policy_tokenizer, prompt_format)
        self.attention = None
        if want_attention:
            self.attention = LayerAttention(DeepSpeedStrategy.module(engine), attention_layer)

    @torch.no_grad()
    def __call__(self, prompts, policy_prompts, responses, width: int):
        """(scores (B,), ABC attention on policy tokens (B, width) or None)."""
        inp = self.inputs(prompts, policy_prompts, responses)
        ids, mask = self.batch(inp)
        if self.attention is None:
            return sequence_scores(self.engine, ids, mask).cpu(), None
        with self.attention.capture():
            scores = sequence_scores(self.engine, ids, mask)
        rows = self.attention.rows(mask, last_token_index(mask)[:, None])[:, 0]
        return scores.cpu(), self.to_policy(rows, inp, width, mean=False)


class GoldRewardScorer:
    """The task's gold scorer as the reward (--reward_model_type gold): its logit of prompt + response
    text, exactly what evaluation reports as gold_reward. No model and no attention. With it the oracle
    calculator's credit is R's own split, so the pair sparse/oracle measures what exact credit can
    gain in a setting, free of how well a reward model learned the task."""

    def __init__(self, gold, policy_tokenizer):
        self.gold, self.tokenizer = gold, policy_tokenizer

    def __call__(self, prompts, policy_prompts, responses, width: int):
        """(scores (B,), None)."""
        texts = [p + self.tokenizer.decode(r, skip_special_tokens=True) for p, r in zip(prompts, responses)]
        return torch.tensor(self.gold.logit(texts), dtype=torch.float32), None


class DiscriminatorScorer(Scorer):
    @torch.no_grad()
    def __call__(self, prompts, policy_prompts, responses, width: int) -> torch.Tensor:
        """TLCR rewards 2p-1 on policy tokens (B, width)."""
        inp = self.inputs(prompts, policy_prompts, responses)
        ids, mask = self.batch(inp)
        return self.to_policy(token_rewards(token_logits(self.engine, ids, mask)), inp, width, mean=True)


class VPLScorer(Scorer):
    """A personalised reward: the VPL decoder's score of each response given its user's z.

    z is inferred once per user (z = mu, as at evaluation) from their context pairs, embedded by
    the frozen backbone (the export's `context_backbone/` when LoRA tuned the target one): the
    default user's for prompts that name none, the named user's otherwise. The baselines (no
    encoder) score without it.
    """
    per_user = True  # the rollout passes each prompt's user

    def __init__(self, engine, head, tokenizer, policy_tokenizer, prompt_format: str):
        super().__init__(engine, tokenizer, policy_tokenizer, prompt_format)
        self.head, self.latents = head.to(engine.device), None

    @torch.no_grad()
    def set_users(self, strategy, context_engine, default: list[dict],
                  named: Optional[dict[str, list[dict]]] = None) -> None:
        """Infer every user's z in one pass, embedded as in training (the export's max length and format)."""
        extra = self.head.cfg.extra
        groups = {None: default, **(named or {})}
        pairs = [[encode_pair(self.tokenizer, r, extra.get("max_seq_len", 512), extra.get("prompt_format", "raw"),
                              "truncate") for r in rows] for rows in groups.values()]
        flat = [p for g in pairs for p in g]
        emb = embed_sequences(strategy, context_engine, [p["chosen_ids"] for p in flat] +
                              [p["rejected_ids"] for p in flat], self.tokenizer.pad_token_id, 32, desc="VPL context")
        pair_emb = torch.cat([emb[:len(flat)], emb[len(flat):]], -1)
        ctx = pair_emb.new_zeros(len(pairs), max(map(len, pairs)), pair_emb.shape[-1])
        mask = torch.zeros(ctx.shape[:2], dtype=torch.bool)
        start = 0
        for i, g in enumerate(pairs):
            ctx[i, :len(g)], mask[i, :len(g)] = pair_emb[start:start + len(g)], True
            start += len(g)
        z, _, _ = self.head.user_latent(ctx.to(self.engine.device), mask.to(self.engine.device))
        self.latents = None if z is None else dict(zip(groups, z[:, None]))

    @torch.no_grad()
    def __call__(self, prompts, policy_prompts, responses, width: int, users: Optional[list] = None):
        """(scores (B,), None): no attention map (calculators that need one refuse a VPL reward)."""
        ids, mask = self.batch(self.inputs(prompts, policy_prompts, responses))
        emb = last_token_hidden(self.engine, ids, mask)
        z = None
        if self.latents is not None:
            z = torch.cat([self.latents[u] for u in (users or [None] * len(emb))])
        return self.head.scores(self.head.outputs(emb, z)).cpu(), None
