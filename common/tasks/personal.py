"""Personalised data sets for VPL: names that resolve to built folders, and the IMDb variant.

`--data_path pets` and `--data_path imdb_personal` are built offline into the cache on
first use (train.jsonl / eval.jsonl, PERSONAL schema); anything else is a file or folder.

IMDb personal: users with opposite tastes over the embedded task's review continuations.
`positive` prefers the continuation the gold scorer rates more positive, `negative` the
other one (every such pair is controversial); both prefer a real continuation over the
same words shuffled (agreed pairs).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from common import presets
from common.data.schemas import PAIR, PERSONAL, validate_row

BUILDER_VERSION = 1
NAMED = ("pets", "imdb_personal")
IMDB_ROWS = {"train": 3000, "eval": 300}   # source pairs used per split (each gives 1-2 rows)
AGREED_SHARE = 0.5                          # chance a source pair also gives an agreed row


def resolve_personal_spec(spec: str, seed: int = 0) -> str:
    """A named personal data set -> its built folder (built once, atomically); others unchanged."""
    if spec not in NAMED:
        return spec
    out = presets.cache_dir() / f"{spec}-seed{seed}-v{BUILDER_VERSION}"
    if (out / "eval.jsonl").is_file():
        return str(out)
    with presets.lock_for(out):
        if not (out / "eval.jsonl").is_file():
            with presets.atomic_folder(out) as tmp:
                if spec == "pets":
                    from common.tasks.pets import write
                    write(tmp, seed)
                else:
                    write_imdb_personal(tmp, seed)
    return str(out)


def imdb_personal_rows(pairs: list[dict], scorer, rng: random.Random) -> list[dict]:
    """Personal rows from (prompt, chosen, rejected) pairs, ordered per user by gold logits."""
    a = scorer.logit([p["prompt"] + p["chosen"] for p in pairs])
    b = scorer.logit([p["prompt"] + p["rejected"] for p in pairs])
    rows = []
    for pair, sa, sb in zip(pairs, a, b):
        if sa == sb:
            continue
        pos, neg = (pair["chosen"], pair["rejected"]) if sa > sb else (pair["rejected"], pair["chosen"])
        user = rng.choice(("positive", "negative"))
        chosen, rejected = (pos, neg) if user == "positive" else (neg, pos)
        rows.append({"user": user, "prompt": pair["prompt"], "chosen": chosen, "rejected": rejected,
                     "controversial": True})
        if rng.random() < AGREED_SHARE:
            real = rng.choice((pos, neg))
            words = real.split()
            shuffled = words[:]
            rng.shuffle(shuffled)
            if shuffled != words:
                rows.append({"user": rng.choice(("positive", "negative")), "prompt": pair["prompt"],
                             "chosen": real, "rejected": " " + " ".join(shuffled), "controversial": False})
    return rows


def write_imdb_personal(out_dir: Path, seed: int = 0) -> Path:
    from common.data.loaders import read_file
    from common.gold import GoldScorer
    from common.tasks.imdb import build_imdb_task
    task = build_imdb_task()
    scorer = GoldScorer.load(task / "gold_scorer.json")
    rng = random.Random(seed)
    for split, n in IMDB_ROWS.items():
        rows = imdb_personal_rows(read_file(task / "pairs" / f"{split}.jsonl", PAIR)[:n], scorer, rng)
        for i, r in enumerate(rows):
            validate_row(r, PERSONAL, f"imdb_personal {split} row {i}")
        (Path(out_dir) / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows),
                                                      encoding="utf-8")
    return Path(out_dir)
