"""Can this setting show a credit-assignment effect at all? Seconds of checks before any RL.

On policy samples of held-out prompts:
- the reward model's attention (what ABC redistributes R by): its normalised entropy over the
  response (1: uniform, so ABC is uniform + sparse) and its rank correlation with the reward
  model's own occlusion sensitivity |R(y) - R(y without y_t)| (does attention point at the
  tokens that move the score?);
- the same correlation for the oracle's gold credit |c_t|, a reference for what informative
  credit looks like against this reward model, and for every layer's attention (ABC reads the
  last: is the credit in another one?);
- every layer's rank correlation with the oracle's |c_t| itself: ABC's form with |c_t| as its
  map (the `oracle_abc` ablation) learns as fast as the oracle, so this asks how close a layer
  comes to that map;
- the greedy-vs-sampled score gap and how repetitive greedy answers are (ReMax's baseline is
  the greedy answer's score: a degenerate greedy answer makes the advantage a constant).

The attention and scores come from the stage-3 scorer itself (step3_rlhf/scoring.py), so what
is measured is what ABC receives.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

# below these the reward model's attention is not a credit signal ABC can use
MAX_ENTROPY, MIN_RANK_CORRELATION = 0.9, 0.2


@dataclass
class Diagnostics:
    samples: int
    answer_len: int
    attention_entropy: float        # mean normalised entropy of the RM's response attention (1 = uniform)
    attention_vs_occlusion: float   # mean Spearman correlation, attention vs |occlusion effect|
    by_layer: list                  # the same for every layer's head-mean row from the scoring token (eager)
    oracle_vs_occlusion: float      # the same for the gold scorer's |per-token credit|
    by_layer_vs_oracle: list        # each layer's row against the gold scorer's |per-token credit|
    sampled_score: float
    greedy_score: float
    greedy_repetitive: float        # fraction of greedy answers with under half distinct bigrams
    verdict: str

    def as_dict(self) -> dict:
        return asdict(self)


def normalised_entropy(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's weights over its mask, normalised by log n (rows with n < 2: nan)."""
    w = weights.float().clamp(min=0) * mask
    p = w / w.sum(-1, keepdim=True).clamp(min=1e-30)
    h = -(p * p.clamp(min=1e-30).log()).sum(-1)
    n = mask.sum(-1).float()
    return torch.where(n > 1, h / n.clamp(min=2).log(), torch.full_like(h, math.nan))


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (ties averaged); nan when either side is constant."""
    from scipy.stats import spearmanr
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    return float(spearmanr(a, b).statistic)


def repetitive(ids: list[int]) -> bool:
    bigrams = list(zip(ids, ids[1:]))
    return len(bigrams) >= 4 and len(set(bigrams)) < len(bigrams) / 2


def verdict(entropy: float, correlation: float, by_layer: list[float] = ()) -> str:
    if entropy > MAX_ENTROPY or not correlation >= MIN_RANK_CORRELATION:
        text = (f"ABC cannot be tested with this reward model: its attention is near-uniform or unrelated to "
                f"what moves its score (entropy {entropy:.2f}, limit {MAX_ENTROPY}; rank correlation with "
                f"occlusion {correlation:.2f}, needs {MIN_RANK_CORRELATION})")
        best = max(range(len(by_layer)), key=lambda i: by_layer[i] if by_layer[i] == by_layer[i] else -2, default=None)
        if best is not None and by_layer[best] >= MIN_RANK_CORRELATION and best != len(by_layer) - 1:
            text += (f". Layer {best}'s attention does agree with occlusion ({by_layer[best]:+.2f}): "
                     f"`--abc_attention_layer {best}` reads it, a variant of the published ABC")
        return text
    return (f"the reward model's attention carries credit (entropy {entropy:.2f}, rank correlation with "
            f"occlusion {correlation:.2f})")


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


class _Plain:
    """A model where the stage-3 scorers expect a DeepSpeed engine (.module, .device, callable)."""

    def __init__(self, model):
        self.module, self.device = model, model.device

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


@torch.no_grad()
def diagnose(sft_path: str, reward_path: str, prompts: list[str], gold=None, answer_len: int = 15,
             min_answer_len: int = 0, seed: int = 0, batch: int = 16) -> Diagnostics:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from common.data.batches import pad
    from common.data.encode import prompt_ids
    from common.oracle import gold_token_credit
    from step3_rlhf.rollout import response_mask
    from step3_rlhf.scoring import RewardScorer
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(sft_path)
    tok.pad_token = tok.pad_token or tok.eos_token
    policy = AutoModelForCausalLM.from_pretrained(sft_path).eval()
    rm_tok = AutoTokenizer.from_pretrained(reward_path)
    rm_tok.pad_token = rm_tok.pad_token or rm_tok.eos_token
    rm = _Plain(AutoModelForSequenceClassification.from_pretrained(reward_path).eval())
    eager = AutoModelForSequenceClassification.from_pretrained(reward_path, attn_implementation="eager").eval()
    scorer = RewardScorer(rm, rm_tok, tok, "raw", want_attention=True)
    entropies, att_corr, oracle_corr, sampled, greedy, reps = [], [], [], [], [], []
    layer_corr: dict[int, list[float]] = {}
    layer_oracle: dict[int, list[float]] = {}
    for i in range(0, len(prompts), batch):
        texts = prompts[i:i + batch]
        ids = [prompt_ids(tok, t) for t in texts]
        seq, mask = pad(ids, tok.pad_token_id, side="left")
        width = seq.shape[1]
        runs = {}
        for name, kw in (("sampled", dict(do_sample=True, top_k=0, top_p=1.0)), ("greedy", dict(do_sample=False))):
            out = policy.generate(input_ids=seq, attention_mask=mask, max_new_tokens=answer_len,
                                  min_new_tokens=min_answer_len, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, **kw)[:, width:]
            r_mask = response_mask(out, tok.eos_token_id)
            runs[name] = [r[m.bool()].tolist() for r, m in zip(out, r_mask)]
        scores, attention = scorer(texts, ids, runs["sampled"], answer_len)
        sampled += scores.tolist()
        greedy += scorer(texts, ids, runs["greedy"], answer_len)[0].tolist()
        reps += [repetitive(r) for r in runs["greedy"]]
        r_mask = torch.zeros(len(texts), answer_len)
        for b, r in enumerate(runs["sampled"]):
            r_mask[b, :len(r)] = 1
        entropies += normalised_entropy(attention, r_mask).tolist()
        credit = gold_token_credit(gold, tok, texts, runs["sampled"], answer_len) if gold is not None else None
        for b, (text, p_ids, resp) in enumerate(zip(texts, ids, runs["sampled"])):
            body = len(resp) - 1 if resp and resp[-1] == tok.eos_token_id else len(resp)  # the EOS scores: kept
            if body < 3:
                continue
            occluded = [resp[:t] + resp[t + 1:] for t in range(body)]
            effect = (scorer([text] * body, [p_ids] * body, occluded, answer_len)[0] - scores[b]).abs().tolist()
            att_corr.append(spearman(attention[b, :body].tolist(), effect))
            gold_abs = credit[b, :body].abs().tolist() if credit is not None else None
            if scorer.same:  # every layer's row from the scoring token (EOS), response keys only
                ids_b = [p_ids + resp + ([] if resp[-1] == tok.eos_token_id else [tok.eos_token_id])]
                layers = eager(input_ids=torch.tensor(ids_b), output_attentions=True).attentions
                for layer, att in enumerate(layers):
                    row = att[0].mean(0)[-1, len(p_ids):len(p_ids) + body]
                    layer_corr.setdefault(layer, []).append(spearman(row.tolist(), effect))
                    if gold_abs is not None:
                        layer_oracle.setdefault(layer, []).append(spearman(row.tolist(), gold_abs))
            if gold_abs is not None:
                oracle_corr.append(spearman(gold_abs, effect))
    entropy, corr = _nanmean(entropies), _nanmean(att_corr)
    by_layer = [_nanmean(layer_corr[i]) for i in sorted(layer_corr)]
    by_layer_vs_oracle = [_nanmean(layer_oracle[i]) for i in sorted(layer_oracle)]
    return Diagnostics(len(prompts), answer_len, entropy, corr, by_layer, _nanmean(oracle_corr), by_layer_vs_oracle,
                       sum(sampled) / len(sampled), sum(greedy) / len(greedy), sum(reps) / len(reps),
                       verdict(entropy, corr, by_layer))


def markdown(d: dict) -> str:
    return "\n".join([
        f"On {d['samples']} sampled answers of up to {d['answer_len']} tokens to held-out prompts, before any RL:\n",
        "| check | value |", "|---|---|",
        f"| reward model's attention over the response, normalised entropy (1 = uniform) | {d['attention_entropy']:.3f} |",
        f"| its rank correlation with the reward model's occlusion sensitivity | {d['attention_vs_occlusion']:+.3f} |",
        *([f"| the same for each layer's attention, first to last (ABC reads the last) | "
           f"{', '.join(f'{v:+.3f}' for v in d['by_layer'])} |"] if d.get("by_layer") else []),
        f"| the gold scorer's per-token credit, rank correlation with the same | {d['oracle_vs_occlusion']:+.3f} |",
        *([f"| each layer's attention against the gold scorer's per-token credit, first to last | "
           f"{', '.join(f'{v:+.3f}' for v in d['by_layer_vs_oracle'])} |"] if d.get("by_layer_vs_oracle") else []),
        f"| mean score, sampled answers | {d['sampled_score']:+.3f} |",
        f"| mean score, greedy answers (ReMax's baseline) | {d['greedy_score']:+.3f} |",
        f"| greedy answers with under half distinct bigrams | {d['greedy_repetitive']:.0%} |",
        "", f"Verdict: {d['verdict']}."])


def markdown_by_setting(results: dict[str, dict]) -> str:
    """One table per setting's answer length (a single setting: its table alone)."""
    if len(results) == 1:
        return markdown(next(iter(results.values())))
    return "\n\n".join(f"#### {name} setting\n\n{markdown(result)}" for name, result in results.items())
