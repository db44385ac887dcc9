"""From `--data_path` specs to tokenised, cached `datasets.Dataset`s for one stage."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from common.data.encode import Skip
from common.data.loaders import EMBEDDED, load_split_rows
from common.data.schemas import Schema
from common.errors import ConfigError, DataError

CACHE_VERSION = 1


def parse_split(split: str) -> list[float]:
    """'2,4,4' -> shares of stages 1..3; '' means every stage uses all rows."""
    if not split:
        return []
    try:
        weights = [float(x) for x in split.split(",")]
    except ValueError:
        raise ConfigError(f"--data_split {split!r}: expected three comma-separated numbers, e.g. 2,4,4") from None
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(f"--data_split {split!r}: expected three non-negative numbers, e.g. 2,4,4")
    return weights


def stage_share(rows: list, split: str, stage: int, seed: int, source: str) -> list:
    """This stage's part of `rows` under `--data_split` (a seeded, disjoint partition)."""
    weights = parse_split(split)
    if not weights:
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    total = sum(weights)
    bounds = [round(len(rows) * sum(weights[:i]) / total) for i in range(4)]
    mine = sorted(order[bounds[stage - 1]:bounds[stage]])
    if not mine:
        raise DataError(source, f"--data_split {split} leaves stage {stage} no rows "
                                f"(of {len(rows)}); give this stage a larger share")
    return [rows[i] for i in mine]


def prepare_tokenized(cfg, schema: Schema, tokenizer, encode: Callable, stage: int, strategy,
                      max_len: Optional[int] = None):
    """(train, eval, stats): tokenised datasets, built once on rank 0 and cached."""
    import datasets
    max_len = max_len or cfg.max_seq_len
    key = _cache_key(cfg, schema, tokenizer, encode, stage, max_len)
    folder = Path(cfg.data_output_path) / f"{schema.name}-stage{stage}-{key}"
    if strategy.is_main and not (folder / "stats.json").is_file():
        _build(cfg, schema, tokenizer, encode, stage, folder, max_len)
    strategy.barrier()
    stats = json.loads((folder / "stats.json").read_text())
    train = datasets.load_from_disk(str(folder / "train"))
    evaluation = datasets.load_from_disk(str(folder / "eval"))
    if len(train) == 0:
        raise DataError(",".join(cfg.data_path), f"no usable training rows for stage {stage} "
                                                 f"(skipped: {stats['skipped']})")
    return train, evaluation, stats


def _build(cfg, schema, tokenizer, encode, stage, folder: Path, max_len: int) -> None:
    import datasets
    train_rows, eval_rows = [], []
    for spec in cfg.data_path:
        train, evaluation = load_split_rows(spec, schema, cfg.eval_ratio, cfg.seed)
        train_rows += stage_share(train, cfg.data_split, stage, cfg.seed, spec)
        eval_rows += evaluation
    if cfg.max_eval_samples:
        eval_rows = eval_rows[: cfg.max_eval_samples]
    skipped: Counter = Counter()

    def encode_all(rows, split):
        out = []
        for row in rows:
            example = encode(tokenizer, row, max_len, cfg.prompt_format, cfg.too_long)
            if example is None:
                skipped[f"{split}: longer than {max_len} tokens"] += 1
            elif isinstance(example, Skip):
                skipped[f"{split}: {example.reason}"] += 1
            else:  # one example, or several (a revision row gives two)
                out.extend(example if isinstance(example, list) else [example])
        return out
    train, evaluation = encode_all(train_rows, "train"), encode_all(eval_rows, "eval")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset.from_list(train).save_to_disk(str(tmp / "train"))
    datasets.Dataset.from_list(evaluation).save_to_disk(str(tmp / "eval"))
    stats = {"train": len(train), "eval": len(evaluation), "skipped": dict(skipped),
             "sources": cfg.data_path}
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _cache_key(cfg, schema, tokenizer, encode, stage, max_len) -> str:
    sources = []
    for spec in cfg.data_path:
        p = embedded_manifest() if spec in EMBEDDED else Path(spec)  # a rebuilt task re-tokenises
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        sources.append([spec] + [(str(f), f.stat().st_size, f.stat().st_mtime_ns)
                                 for f in files if f.is_file()])
    parts = [CACHE_VERSION, sources, schema.name, stage, cfg.data_split, cfg.seed, cfg.eval_ratio,
             cfg.max_eval_samples, max_len, cfg.prompt_format, cfg.too_long,
             encode.__name__, tokenizer.name_or_path, len(tokenizer),
             getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def embedded_manifest() -> Path:
    from common.tasks.imdb import build_imdb_task
    return build_imdb_task() / "manifest.json"
