"""UltraFeedback-P-2 / P-4: users defined by UltraFeedback's fine-grained rating attributes.

Each user is one attribute (P-2: helpfulness, honesty; P-4 adds instruction_following and
truthfulness). A pair of completions of one instruction is labelled for a user by that
attribute's ratings; a tie (or an N/A rating) drops the pair for that user only. A pair
is `controversial` when the labelling users disagree. A fixed, seeded subset of the
instructions (published: 100) is the survey pool: its pairs are marked `survey` and only
serve as contexts; the other instructions are split into train and eval.
"""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Optional

from common.data.schemas import PERSONAL, validate_row
from common.errors import DataError

HUB_NAME = "openbmb/UltraFeedback"
ATTRIBUTES = {"P-2": ("helpfulness", "honesty"),
              "P-4": ("helpfulness", "honesty", "instruction_following", "truthfulness")}


def read_source(source: str) -> list[tuple[dict, str]]:
    """(row, where) from a local .jsonl/.json/.parquet copy, or the hub data set (needs a network)."""
    path = Path(source)
    if path.suffix == ".jsonl" and path.is_file():
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append((json.loads(line), f"{path}:{n}"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}", f"malformed JSON ({e.msg})") from None
        return out
    import datasets
    if path.suffix in (".json", ".parquet") and path.is_file():
        ds = datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train")
    elif path.exists():
        raise DataError(str(path), "expected a .jsonl, .json or .parquet copy of UltraFeedback")
    else:
        ds = datasets.load_dataset(source, split="train")
    return [(row, f"{source}: row {i}") for i, row in enumerate(ds)]


def rating(completion: dict, attribute: str, where: str) -> Optional[float]:
    try:
        value = completion["annotations"][attribute]["Rating"]
    except (KeyError, TypeError):
        raise DataError(f"{where}: field 'annotations.{attribute}.Rating'", "missing") from None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # UltraFeedback writes "N/A" where a rater gave none


def build(rows: list[tuple[dict, str]], variant: str = "P-2", survey_size: int = 100, eval_ratio: float = 0.1,
          seed: int = 0, controversial_only: bool = False) -> dict[str, list[dict]]:
    """{'train': rows (survey rows included, flagged), 'eval': rows} in the PERSONAL schema."""
    users = ATTRIBUTES[variant]
    usable = []
    for row, where in rows:
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not isinstance(
                row.get("completions"), list):
            raise DataError(where, "expected fields 'instruction' (string) and 'completions' (list)")
        if len(row["completions"]) >= 2:
            usable.append((row, where))
    order = list(range(len(usable)))
    random.Random(seed).shuffle(order)
    survey = set(order[:survey_size])
    n_eval = round((len(order) - len(survey)) * eval_ratio)
    held = set(order[len(survey):len(survey) + n_eval])
    out: dict[str, list[dict]] = {"train": [], "eval": []}
    for i, (row, where) in enumerate(usable):
        for (a, ca), (b, cb) in itertools.combinations(enumerate(row["completions"]), 2):
            labels = {}
            for user in users:
                ra = rating(ca, user, f"{where}: completions[{a}]")
                rb = rating(cb, user, f"{where}: completions[{b}]")
                if ra is not None and rb is not None and ra != rb:
                    labels[user] = ra > rb
            controversial = len(set(labels.values())) > 1
            if controversial_only and not controversial:
                continue
            for user, a_wins in labels.items():
                win, lose = (ca, cb) if a_wins else (cb, ca)
                r = {"user": user, "prompt": row["instruction"], "chosen": win.get("response", ""),
                     "rejected": lose.get("response", ""), "controversial": controversial, "survey": i in survey}
                validate_row(r, PERSONAL, f"{where}: completions[{a}] vs [{b}]")
                out["eval" if i in held else "train"].append(r)
    return out


def write(out_dir: Path, source: str = HUB_NAME, **kw) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in build(read_source(source), **kw).items():
        (out_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out_dir
