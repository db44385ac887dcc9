"""TLCR token labels: which tokens a revision changed, from a token-level Levenshtein alignment.

A revision row is (prompt, rejected, revised). Aligning the two token sequences marks, in
the rejected response, tokens the reviser substituted or deleted (NEGATIVE) and, in the
revised response, tokens substituted or inserted (POSITIVE); aligned unchanged tokens are
NEUTRAL. The discriminator learns these with soft targets (see `common.heads`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from common.data.encode import IGNORE, Skip, prompt_ids
from common.data.loaders import _jsonl  # the JSONL reader whose errors name file:line
from common.data.schemas import REVISION, validate_row
from common.errors import DataError, DensehfError

NEGATIVE = 0  # rejected-side token the reviser substituted or deleted
POSITIVE = 1  # revised-side token the reviser substituted or inserted
NEUTRAL = 2   # unchanged token, or EOS
__all__ = ["NEGATIVE", "POSITIVE", "NEUTRAL", "IGNORE", "Skip", "align_labels", "label_revision",
           "label_file", "encode_revision"]

# The label tool reports empty responses as counted skips rather than stopping at the first.
_REVISION_MAY_BE_EMPTY = replace(REVISION, may_be_empty=REVISION.required)

Side = tuple[list[int], list[int]]  # one response's token ids (EOS last) and their labels


def align_labels(rejected: Sequence[int], revised: Sequence[int]) -> tuple[list[int], list[int]]:
    """Per-token labels of both sides from a minimum edit-distance alignment.

    Cost: unit insert/delete/substitute. Among alignments of minimum cost, the one keeping
    the most tokens unchanged wins (so a swap [1,2]->[2,1] keeps one token NEUTRAL instead
    of substituting both). This is one DP with cost K per edit and -1 per match,
    K = min(n, m) + 1, so the match count never outweighs an edit. Remaining ties are
    broken by the backtrace, which walks from the ends and prefers, in order: match,
    substitute, delete (rejected token), insert (revised token); repeated tokens
    therefore align to their latest occurrences.
    """
    a, b = np.asarray(rejected, dtype=np.int64), np.asarray(revised, dtype=np.int64)
    n, m = len(a), len(b)
    k = min(n, m) + 1
    cols = np.arange(m + 1, dtype=np.int64) * k
    table = np.empty((n + 1, m + 1), dtype=np.int64)
    table[0] = cols
    for i in range(1, n + 1):  # each row vectorised: insertions are a running minimum
        prev = table[i - 1]
        best = np.empty(m + 1, dtype=np.int64)
        best[0] = i * k
        best[1:] = np.minimum(prev[:-1] + np.where(b == a[i - 1], -1, k), prev[1:] + k)
        table[i] = np.minimum.accumulate(best - cols) + cols
    return _backtrace(table.tolist(), list(rejected), list(revised), k)


def _backtrace(table: list[list[int]], a: list[int], b: list[int],
               k: int) -> tuple[list[int], list[int]]:
    rej, rev = [NEUTRAL] * len(a), [NEUTRAL] * len(b)
    i, j = len(a), len(b)
    while i or j:
        here = table[i][j]
        if i and j and a[i - 1] == b[j - 1] and here == table[i - 1][j - 1] - 1:
            i, j = i - 1, j - 1
        elif i and j and here == table[i - 1][j - 1] + k:
            i, j = i - 1, j - 1
            rej[i], rev[j] = NEGATIVE, POSITIVE
        elif i and here == table[i - 1][j] + k:
            i -= 1
            rej[i] = NEGATIVE
        else:
            j -= 1
            rev[j] = POSITIVE
    return rej, rev


def _label_responses(tokenizer, rejected: str, revised: str) -> Union[tuple[Side, Side], Skip]:
    """Both responses tokenised separately, labelled, EOS appended (NEUTRAL); or why not."""
    if not rejected.strip():
        return Skip("empty rejected")
    if not revised.strip():
        return Skip("empty revised")
    if tokenizer.eos_token_id is None:
        raise DensehfError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; "
                           f"densehf needs one to end responses")
    rej_ids = tokenizer(rejected, add_special_tokens=False)["input_ids"]
    rev_ids = tokenizer(revised, add_special_tokens=False)["input_ids"]
    if rej_ids == rev_ids:
        return Skip("revision identical to rejected")
    rej_labels, rev_labels = align_labels(rej_ids, rev_ids)
    eos = tokenizer.eos_token_id
    return (rej_ids + [eos], rej_labels + [NEUTRAL]), (rev_ids + [eos], rev_labels + [NEUTRAL])


def _with_prompt(prompt: list[int], sides: tuple[Side, Side],
                 max_seq_len: int) -> Union[tuple[dict, dict], Skip]:
    """Two examples {"input_ids", "labels"}, prompt labelled IGNORE, cut to max_seq_len.

    Too long: the prompt keeps its last max_seq_len // 2 tokens at most, then the response
    is cut from the right. A row whose every edit was cut away is skipped: it would teach
    only NEUTRAL.
    """
    examples = []
    for ids, labels in sides:
        p = prompt
        if len(p) + len(ids) > max_seq_len:
            p = p[len(p) - min(len(p), max_seq_len // 2):]
            ids, labels = ids[: max_seq_len - len(p)], labels[: max_seq_len - len(p)]
        examples.append({"input_ids": p + ids, "labels": [IGNORE] * len(p) + labels})
    if not any(label in (NEGATIVE, POSITIVE) for e in examples for label in e["labels"]):
        return Skip(f"every edit past max_seq_len={max_seq_len}")
    return examples[0], examples[1]


def label_revision(tokenizer, prompt: str, rejected: str, revised: str,
                   max_seq_len: int) -> Union[tuple[dict, dict], Skip]:
    """(rejected example, revised example), or a Skip naming why the row has no signal.

    The prompt gets BOS first only when the tokenizer itself adds BOS by default
    (e.g. Llama, not GPT-2, whose BOS is its EOS).
    """
    sides = _label_responses(tokenizer, rejected, revised)
    if isinstance(sides, Skip):
        return sides
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a")["input_ids"][:1] == [bos]:
        ids = [bos] + ids
    return _with_prompt(ids, sides, max_seq_len)


def label_file(path: Union[str, Path], tokenizer, max_seq_len: int) -> tuple[list[dict], Counter]:
    """Labelled examples (two per usable row, rejected first) and skip counts by reason.

    Bad JSON, a missing, misspelled or non-string field raise DataError naming file:line;
    empty responses and identical revisions are counted skips, so one run reports them all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "data file not found")
    examples: list[dict] = []
    skipped: Counter = Counter()
    for obj, where in _jsonl(path):
        row = validate_row(obj, _REVISION_MAY_BE_EMPTY, where)
        result = label_revision(tokenizer, row["prompt"], row["rejected"], row["revised"], max_seq_len)
        if isinstance(result, Skip):
            skipped[result.reason] += 1
        else:
            examples.extend(result)
    return examples, skipped


def encode_revision(tokenizer, row: dict, max_len: int, prompt_format: str,
                    too_long: str) -> Optional[Union[list[dict], Skip]]:
    """Stage-2 encoder (see `common.data.prepare`): the prompt is built as in every other
    stage (`prompt_ids`: prompt format, BOS when the tokenizer has one), so the
    discriminator sees sequences shaped like the policy's. None: too long under 'skip'.
    """
    sides = _label_responses(tokenizer, row["rejected"], row["revised"])
    if isinstance(sides, Skip):
        return sides
    prompt = prompt_ids(tokenizer, row["prompt"], prompt_format)
    if too_long == "skip" and any(len(prompt) + len(ids) > max_len for ids, _ in sides):
        return None
    examples = _with_prompt(prompt, sides, max_len)
    return examples if isinstance(examples, Skip) else list(examples)
