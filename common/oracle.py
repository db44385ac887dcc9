"""The oracle calculator's input: the gold scorer's logit shares moved onto policy tokens.

Only a task with a linear gold scorer has one (the embedded IMDb task): the logit of a
TF-IDF + logistic-regression model splits exactly over the words of a text
(`GoldScorer.word_contributions`); a word's share goes to the policy tokens its characters
overlap. Words of the prompt are not the response's doing and are left out.
"""
from __future__ import annotations

import torch

from common.tokenmap import char_spans, overlap_map


def gold_token_credit(gold, tokenizer, prompts: list[str], responses: list[list[int]], width: int) -> torch.Tensor:
    """(B, width): each response token's share of the gold logit of prompt + response text."""
    out = torch.zeros(len(responses), width)
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        if not response:
            continue
        text = tokenizer.decode(response, skip_special_tokens=True)
        spans, shares = gold.word_contributions(prompt + text)   # the text evaluation scores
        start = len(prompt)
        words = [((max(a, start) - start, e - start), c) for (a, e), c in zip(spans, shares) if e > start]
        if not words:
            continue
        moved = overlap_map([w for w, _ in words], char_spans(tokenizer, response))
        out[b, :len(response)] = torch.tensor([c for _, c in words], dtype=torch.float32) @ moved
    return out
