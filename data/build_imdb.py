"""Build the embedded "IMDb positive reviews" task (offline, about 30 s on 2 CPU cores).

Writes SFT text, RL prompts, preference pairs, revisions, the gold sentiment scorer, a
byte-level BPE tokenizer and a tiny random Llama; see data/README.md for every file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.errors import DensehfError  # noqa: E402
from common.presets import task_dir  # noqa: E402
from common.tasks.imdb import build_imdb_task  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Training stages build this task by themselves when given --data_path imdb "
               "or --model_name_or_path tiny; run this script to build it ahead of time.")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {task_dir()}; the cache is "
                             "$DENSEHF_CACHE or <repo>/.cache)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, the samples and the tiny model's init (default: 0)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if a build with the same version and seed is there")
    args = parser.parse_args(argv)
    try:
        out = build_imdb_task(args.out, seed=args.seed, force=args.force)
    except DensehfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
