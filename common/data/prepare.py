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

from common.data.encode import Pretokenised, Skip
from common.data.loaders import EMBEDDED, load_split_rows, source_shape
from common.data.schemas import Schema, with_columns
from common.data.report import format_report, length_stats, planned_steps
from common.errors import ConfigError, DataError, ValidationDone
from common.presets import lock_for

CACHE_VERSION = 3  # 2: duplicates, truncation and length stats; 3: prompts keep their user


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
    """(train, eval, stats): tokenised datasets, built once on rank 0 and cached.

    With --validate_only this is where a stage ends: after the full check, before any model
    loads, with a report (ValidationDone, which `run_main` turns into exit 0).
    """
    import datasets
    max_len = max_len or cfg.max_seq_len
    schema = with_columns(schema, cfg)
    key = _cache_key(cfg, schema, tokenizer, encode, stage, max_len)
    folder = Path(cfg.data_output_path) / f"{schema.name}-stage{stage}-{key}"
    if strategy.is_main:
        with lock_for(folder):  # another job on this machine (an experiment's parallel runs) may be building it
            if not (folder / "stats.json").is_file():
                _build(cfg, schema, tokenizer, encode, stage, folder, max_len)
    strategy.wait_for_main()
    stats = json.loads((folder / "stats.json").read_text())
    # datasets cannot reload an empty saved dataset: an empty split is saved as no folder
    train, evaluation = (datasets.load_from_disk(str(folder / split)) if (folder / split).is_dir()
                         else datasets.Dataset.from_list([]) for split in ("train", "eval"))
    if len(train) == 0:
        raise DataError(",".join(cfg.data_path), f"no usable training rows for stage {stage} "
                                                 f"(skipped: {stats['skipped']})")
    if cfg.validate_only:
        steps = planned_steps(cfg, len(train), strategy.world_size)
        raise ValidationDone(format_report(stats, schema.name, stage, max_len, steps), stats)
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
    tokenizer = Pretokenised(tokenizer, [v for row in train_rows + eval_rows for v in row.values() if isinstance(v, str)])
    stats = {"rows": {"train": len(train_rows), "eval": len(eval_rows)}, "truncated": {},
             "duplicates": {}, "lengths": {}, "skipped": Counter()}

    def encode_all(rows, split):
        out, truncated = [], 0
        rows = _duplicates(rows, split, schema, stats)
        for row in rows:
            # a row that fits is encoded once; only a long one a second time, to count it
            example = encode(tokenizer, row, max_len, cfg.prompt_format, "skip")
            if example is None and cfg.too_long == "truncate":
                example = encode(tokenizer, row, max_len, cfg.prompt_format, "truncate")
                truncated += example is not None and not isinstance(example, Skip)
            if example is None:
                stats["skipped"][f"{split}: longer than {max_len} tokens"] += 1
            elif isinstance(example, Skip):
                stats["skipped"][f"{split}: {example.reason}"] += 1
            else:  # one example, or several (a revision row gives two)
                out.extend(example if isinstance(example, list) else [example])
        stats["truncated"][split] = truncated
        stats["lengths"][split] = length_stats(out)
        return out
    train, evaluation = encode_all(train_rows, "train"), encode_all(eval_rows, "eval")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, examples in (("train", train), ("eval", evaluation)):
        if examples:
            datasets.Dataset.from_list(examples).save_to_disk(str(tmp / split))
    stats.update(train=len(train), eval=len(evaluation), skipped=dict(stats["skipped"]), sources=cfg.data_path,
                 shapes={spec: source_shape(spec, schema) for spec in cfg.data_path})
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _duplicates(rows: list[dict], split: str, schema: Schema, stats: dict) -> list[dict]:
    """Count exact repeats of a row; drop them unless the schema keeps them (RL prompts)."""
    seen, out = set(), []
    stats["duplicates"][split] = 0
    for row in rows:
        key = json.dumps(row, sort_keys=True, default=str)
        if key in seen:
            stats["duplicates"][split] += 1
            if schema.drop_duplicates:
                stats["skipped"][f"{split}: duplicate row"] += 1
                continue
        seen.add(key)
        out.append(row)
    return out


def _cache_key(cfg, schema, tokenizer, encode, stage, max_len) -> str:
    sources = []
    for spec in cfg.data_path:
        p = embedded_manifest() if spec in EMBEDDED else Path(spec)  # a rebuilt task re-tokenises
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        sources.append([spec] + [(str(f), f.stat().st_size, f.stat().st_mtime_ns)
                                 for f in files if f.is_file()])
    mapped = [schema.columns] if schema.columns else []  # unmapped keys stay as they were
    parts = [CACHE_VERSION, sources, schema.name, *mapped, stage, cfg.data_split, cfg.seed, cfg.eval_ratio,
             cfg.max_eval_samples, max_len, cfg.prompt_format, cfg.too_long,
             encode.__name__, tokenizer.name_or_path, len(tokenizer),
             getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def embedded_manifest() -> Path:
    from common.tasks.imdb import build_imdb_task
    return build_imdb_task() / "manifest.json"
