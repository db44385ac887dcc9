"""Read data sets into typed rows: the embedded task, local files, and hub names.

Every row is validated against its schema on the way in, so bad rows stop the run
before training with their file, line and field named (all of a file's, up to a cap).
"""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Optional

from common.data.conversation import is_conversational, parse as parse_conversation
from common.data.schemas import PROMPT, SFT, RowErrors, Schema, validate_row
from common.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
EMBEDDED = {"imdb"}
# which folder of the embedded task serves which schema
EMBEDDED_FOLDERS = {"sft": "sft", "pair": "pairs", "revision": "revisions", "prompt": "prompts"}
UF = "HuggingFaceH4/ultrafeedback_binarized"
UF_COLUMNS = {"prompt", "chosen", "rejected", "messages", "score_chosen", "score_rejected"}


def load_split_rows(spec: str, schema: Schema, eval_ratio: float, seed: int) -> tuple[list, list]:
    """(train rows, eval rows) of one data set named by `spec`."""
    if spec in EMBEDDED:
        from common.tasks.imdb import build_imdb_task
        folder = build_imdb_task() / EMBEDDED_FOLDERS[schema.name]
        schema = replace(schema, columns=())  # the embedded task's own columns: no user mapping
        return read_file(folder / "train.jsonl", schema), read_file(folder / "eval.jsonl", schema)
    path = Path(spec)
    if path.is_dir():
        return _read_folder(path, schema)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError(str(path), "data file not found")
        return _hold_out(read_file(path, schema), eval_ratio, seed)
    return _load_hub(spec, replace(schema, columns=()), eval_ratio, seed)  # hub sets: their parsers map columns


def read_file(path: Path, schema: Schema) -> list[dict]:
    """Every row of a local file, validated; all bad rows are reported together. A local copy of a
    standard set (HH-RLHF dialogues, UltraFeedback-binarized) is recognised by its columns and parsed
    as its hub name is; message lists (TRL's conversational shape) are read as conversations."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "data file not found")
    errors = RowErrors(str(path))
    if path.suffix == ".jsonl":
        objects = list(_jsonl(path, errors))
    elif path.suffix == ".json":
        data = _json(path)
        if not isinstance(data, list):
            raise DataError(str(path), "expected a JSON list of objects (or use .jsonl)")
        objects = [(obj, f"{path}: item {i}") for i, obj in enumerate(data)]
    elif path.suffix in (".parquet", ".csv"):
        import datasets
        kind = path.suffix[1:]
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        first_line = 2 if kind == "csv" else 0  # csv: line 1 is the header
        label = "line" if kind == "csv" else "row"
        objects = [(obj, f"{path}:{label} {i + first_line}") for i, obj in enumerate(ds)]
    else:
        raise DataError(str(path), f"unsupported file type (use one of {', '.join(LOCAL_SUFFIXES)})")
    rows = parse_rows(objects, schema, errors)
    errors.raise_if_any()
    return rows


def parse_rows(objects: list, schema: Schema, errors: RowErrors) -> list[dict]:
    """The valid schema rows of (raw object, place) pairs, read in the shape of the first; bad ones go to `errors`."""
    shape = row_shape(objects[0][0], schema) if objects else "standard"
    if shape not in ("standard", "conversational"):  # parsed onto the schema's own fields: no column mapping
        schema = replace(schema, columns=())
    rows = []
    for obj, where in objects:
        try:
            rows.append(_row(obj, shape, schema, where))
        except DataError as e:
            errors.add(e)
    return rows


SHAPES = {"standard": "standard columns", "Anthropic/hh-rlhf": "Anthropic/hh-rlhf dialogues (chosen, rejected)",
          "Dahoas/rm-static": "Dahoas/rm-static (prompt, response, chosen, rejected)",
          "conversational": "conversational (message lists, rendered with the chat template)",
          UF: f"{UF} (chosen, rejected as conversations; rendered with the chat template)"}


def row_shape(row: object, schema: Schema = SFT) -> str:
    """Which known shape a source's first row has (a key of SHAPES); `schema` maps its columns."""
    if not isinstance(row, dict):
        return "standard"
    if UF_COLUMNS <= set(row) and isinstance(row["chosen"], list):
        return UF
    if is_conversational(row, schema):
        return "conversational"
    if "prompt" not in row and isinstance(row.get("chosen"), str) and "\n\nAssistant:" in row["chosen"] \
            and isinstance(row.get("rejected"), str):
        return "Anthropic/hh-rlhf"
    if {"prompt", "response", "chosen", "rejected"} <= set(row):
        return "Dahoas/rm-static"
    return "standard"


def source_shape(spec: str, schema: Schema = SFT) -> str:
    """How a --data_path entry is read, for the --validate_only report."""
    if spec in EMBEDDED:
        return "the embedded task"
    path = Path(spec)
    if path.is_dir():
        path = next((path / f"train{x}" for x in LOCAL_SUFFIXES if (path / f"train{x}").is_file()), path)
    if not path.is_file():
        return f"hub data set ({spec})"
    return SHAPES[file_shape(path, schema)]


def file_shape(path: Path, schema: Schema = SFT) -> str:
    """The shape of a local file's first row."""
    path = Path(path)
    if path.suffix == ".jsonl":
        first = next(iter(_jsonl(path)), (None, ""))[0]
    elif path.suffix == ".json":
        data = _json(path)
        first = data[0] if isinstance(data, list) and data else None
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=1), None)
        first = batch.to_pylist()[0] if batch is not None and batch.num_rows else None
    elif path.suffix == ".csv":
        import csv
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = next(csv.DictReader(f), None)
    else:
        return "standard"
    return row_shape(first, schema)


def _row(obj, shape: str, schema: Schema, where: str) -> dict:
    """One raw row as a valid row of `schema`, read in `shape`; DataError naming the place if bad."""
    if shape == "standard" or not isinstance(obj, dict):
        return validate_row(obj, schema, where)
    if shape in ("conversational", UF):
        return parse_conversation(obj, schema, where)
    try:
        parsed = parse_hub_row(shape, obj, schema)
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(where, f"not a row of {SHAPES[shape]}: {type(e).__name__} {e}") from None
    return validate_row(parsed, schema, where)


def _jsonl(path: Path, errors: Optional[RowErrors] = None):
    """(object, 'file:line') per parseable line; an undecodable or malformed line goes to
    `errors` (or is raised at once without one, as `common.token_labels` wants)."""
    def bad(error: DataError) -> None:
        if errors is None:
            raise error
        errors.add(error)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:  # a byte-order mark (Windows editors write one) is not part of the first row
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                bad(DataError(where, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))
                continue
            if not line.strip():
                continue
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as e:
                bad(DataError(where, f"malformed JSON ({e.msg} at column {e.colno})"))


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}", f"malformed JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise DataError(str(path), "not UTF-8 text") from None


def _read_folder(folder: Path, schema: Schema) -> tuple[list, list]:
    def find(*stems):
        for stem in stems:
            for suffix in LOCAL_SUFFIXES:
                if (folder / f"{stem}{suffix}").is_file():
                    return folder / f"{stem}{suffix}"
        return None
    train, evaluation = find("train"), find("eval", "test", "validation")
    if train is None:
        raise DataError(str(folder), f"no train{{{','.join(LOCAL_SUFFIXES)}}} in this folder")
    train_rows = read_file(train, schema)
    return train_rows, read_file(evaluation, schema) if evaluation else []


def _hold_out(rows: list, eval_ratio: float, seed: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(rows) * eval_ratio)) if len(rows) > 1 else 0
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


# ---- hub data sets (need a network; parsers are plain functions tested offline) ------
def split_hh_dialogue(text: str) -> tuple[str, str]:
    """Anthropic/hh-rlhf stores whole dialogues: the prompt ends at the last Assistant turn."""
    marker = "\n\nAssistant:"
    cut = text.rfind(marker)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    return text[: cut + len(marker)], text[cut + len(marker):]


def parse_hub_row(name: str, raw: dict, schema: Schema) -> dict:
    """Map one raw row of a known hub data set onto `schema`'s fields."""
    if name == "Anthropic/hh-rlhf":
        prompt, chosen = split_hh_dialogue(raw["chosen"])
        _, rejected = split_hh_dialogue(raw["rejected"])
        raw = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    # Dahoas/rm-static and Dahoas/full-hh-rlhf: prompt, response, chosen, rejected
    if schema.name == SFT.name:
        return {"prompt": raw["prompt"], "response": raw.get("response") or raw["chosen"]}
    if schema.name == PROMPT.name:
        return {"prompt": raw["prompt"]}
    return {k: raw[k] for k in schema.required}


def _load_hub(name: str, schema: Schema, eval_ratio: float, seed: int) -> tuple[list, list]:
    """A hub data set (from `datasets`' cache when offline), its rows read in their shape as a local file's are."""
    import datasets
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # no network, unknown name, ...
        raise DataError(name, f"not a local file or folder, and loading it from the hub failed: "
                              f"{type(e).__name__}: {str(e)[:200]}") from None

    def rows(split):
        errors = RowErrors(f"{name}[{split}]")
        out = parse_rows([(raw, f"{name}[{split}] row {i}") for i, raw in enumerate(ds[split])], schema, errors)
        errors.raise_if_any()
        return out
    train_split = next((s for s in ("train", "train_prefs") if s in ds), next(iter(ds)))
    eval_split = next((s for s in ("test", "validation", "eval", "test_prefs") if s in ds), None)
    if eval_split is None:
        return _hold_out(rows(train_split), eval_ratio, seed)
    return rows(train_split), rows(eval_split)
