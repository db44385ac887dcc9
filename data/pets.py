"""Write the Pets personalised preference data set (two users, templates; see data/README.md).

    python data/pets.py --out data_out/pets --seed 0 [--upsample_controversial 2]

Stages build it by themselves for `--data_path pets` (into the cache, with --seed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.tasks.pets import write  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default: 0)")
    parser.add_argument("--train_per_user", type=int, default=400, help="training pairs per user (default: 400)")
    parser.add_argument("--eval_per_user", type=int, default=100, help="evaluation pairs per user (default: 100)")
    parser.add_argument("--upsample_controversial", type=int, default=1,
                        help="draw each controversial pair type this many times as often (default: 1)")
    a = parser.parse_args(argv)
    out = write(a.out, a.seed, train_per_user=a.train_per_user, eval_per_user=a.eval_per_user,
                upsample_controversial=a.upsample_controversial)
    print(f"pets written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
