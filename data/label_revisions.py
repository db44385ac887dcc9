"""Label a revision file for the TLCR token discriminator, and let you eyeball the labels.

    python data/label_revisions.py --input revisions.jsonl --tokenizer PATH_OR_NAME \\
        --max_seq_len 512 --output labelled.jsonl --show 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script

from common.cli import run_main
from common.errors import DensehfError
from common.models import resolve_model_path
from common.token_labels import IGNORE, NEGATIVE, NEUTRAL, POSITIVE, label_file

LABEL_NAMES = {NEGATIVE: "NEGATIVE", POSITIVE: "POSITIVE", NEUTRAL: "neutral"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokenise each revision row ({prompt, rejected, revised}) and label response "
                    "tokens by a token-level Levenshtein alignment: in the rejected response, "
                    "substituted or deleted tokens are NEGATIVE (0); in the revised response, "
                    "substituted or inserted tokens are POSITIVE (1); unchanged tokens and EOS are "
                    "NEUTRAL (2); prompt tokens are -100. Each usable row gives two output lines, "
                    "rejected then revised: {\"input_ids\": [...], \"labels\": [...]}.",
        epilog="Rows with an empty response or a revision token-identical to the rejected one "
               "are skipped and counted; a malformed row stops with its file:line and field.")
    parser.add_argument("--input", required=True, help="JSONL file of {prompt, rejected, revised} rows")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer folder, model folder, densehf stage output, preset or hub name")
    parser.add_argument("--max_seq_len", type=_positive_int, default=512,
                        help="max tokens per example (prompt cut to its last half first; default 512)")
    parser.add_argument("--output", required=True, help="JSONL file to write (atomically)")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print the first N examples, one response token and its label a line")
    return parser.parse_args()


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def load_tokenizer(name: str):
    """A bare tokenizer folder as is; anything else the way every stage resolves models."""
    from transformers import AutoTokenizer
    if (Path(name).is_absolute() or name.startswith(".")) and not Path(name).exists():
        raise DensehfError(f"--tokenizer {name}: no such folder")
    path = name if (Path(name) / "tokenizer_config.json").is_file() else resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DensehfError(f"--tokenizer {name}: cannot load a tokenizer ({e})") from None


def write_jsonl(examples: list[dict], output: Path) -> None:
    """Temp file then rename, so an interrupted run never leaves a half-written output."""
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e) + "\n" for e in examples)
        os.replace(tmp, output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DensehfError(f"--output {output}: cannot write ({e.strerror})") from None


def show(tokenizer, examples: list[dict], n: int) -> None:
    for index, example in enumerate(examples[:n]):
        pairs = [(t, l) for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE]
        side = "rejected" if index % 2 == 0 else "revised"
        print(f"\nexample {index} ({side}, row {index // 2}): "
              f"{len(example['input_ids']) - len(pairs)} prompt tokens, {len(pairs)} response tokens")
        for token, label in pairs:
            print(f"  {tokenizer.decode([token])!r:<24} {LABEL_NAMES[label]}")


def main() -> None:
    args = parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    examples, skipped = label_file(args.input, tokenizer, args.max_seq_len)
    write_jsonl(examples, Path(args.output))
    counts = Counter(label for e in examples for label in e["labels"] if label != IGNORE)
    print(f"{len(examples) // 2} rows labelled -> {len(examples)} examples in {args.output}: "
          + ", ".join(f"{counts[label]} {name}" for label, name in LABEL_NAMES.items()) + " tokens")
    print(f"{sum(skipped.values())} rows skipped" + "".join(
        f"\n  {count} {reason}" for reason, count in skipped.most_common()))
    show(tokenizer, examples, args.show)


if __name__ == "__main__":
    run_main(main)
