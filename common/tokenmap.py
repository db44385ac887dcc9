"""Moving per-token quantities between two tokenizations of the same response text.

The policy and a scoring model (reward model, discriminator) may tokenise differently.
Both tokenisations are laid on the response's characters; each scoring token's value
is shared among the policy tokens its characters overlap. Row sums of the map are 1,
so totals (ABC's sum_t r_t = R) survive the move.
"""
from __future__ import annotations

import torch


def same_tokenizer(a, b) -> bool:
    return (a is b) or (a.get_vocab() == b.get_vocab() and a.bos_token_id == b.bos_token_id
                        and a.eos_token_id == b.eos_token_id)


def char_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token in `decode(ids)` (special tokens: empty spans)."""
    spans, prev = [], 0
    for k in range(1, len(ids) + 1):
        end = len(tokenizer.decode(ids[:k], skip_special_tokens=True))
        end = max(end, prev)  # a partial UTF-8 byte decodes to nothing until it completes
        spans.append((prev, end))
        prev = end
    return spans


def overlap_map(src: list[tuple[int, int]], dst: list[tuple[int, int]]) -> torch.Tensor:
    """(len(src), len(dst)) matrix: share of each source token's characters per target token.

    A source token that overlaps nothing (empty, e.g. EOS, or past the end) goes whole to
    the last target token starting at or before it.
    """
    m = torch.zeros(len(src), len(dst))
    for i, (s0, s1) in enumerate(src):
        for j, (d0, d1) in enumerate(dst):
            m[i, j] = max(0, min(s1, d1) - max(s0, d0))
        total = m[i].sum()
        if total > 0:
            m[i] /= total
        elif dst:
            before = [j for j, (d0, _) in enumerate(dst) if d0 <= s0]
            m[i, before[-1] if before else 0] = 1.0
    return m


def identity_map(n_src: int, n_dst: int) -> torch.Tensor:
    """Same tokenizer: token i is token i; extra source tokens (an appended EOS) fold onto the last."""
    m = torch.zeros(n_src, n_dst)
    for i in range(n_src):
        m[i, min(i, n_dst - 1)] = 1.0
    return m
