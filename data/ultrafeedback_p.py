"""Build UltraFeedback-P-2 or P-4 (users = rating attributes; see data/README.md).

    python data/ultrafeedback_p.py --variant P-4 --out data_out/uf_p4                # hub (network)
    python data/ultrafeedback_p.py --source ultrafeedback.jsonl --out data_out/uf_p2  # a local copy

Then: step2_reward/main.py --model_type vpl --data_path data_out/uf_p2 ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.errors import DensehfError  # noqa: E402
from common.tasks.ultrafeedback_p import ATTRIBUTES, HUB_NAME, write  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=HUB_NAME,
                        help=f"hub name or a .jsonl/.json/.parquet copy (default: {HUB_NAME})")
    parser.add_argument("--variant", choices=tuple(ATTRIBUTES), default="P-2", help="P-2 or P-4 (default: P-2)")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--survey_size", type=int, default=100,
                        help="instructions whose pairs are contexts only (default: 100)")
    parser.add_argument("--eval_ratio", type=float, default=0.1,
                        help="share of the other instructions held out (default: 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the survey and eval choice (default: 0)")
    parser.add_argument("--controversial_only", action="store_true", help="keep only pairs the users disagree on")
    a = parser.parse_args(argv)
    try:
        out = write(a.out, a.source, variant=a.variant, survey_size=a.survey_size, eval_ratio=a.eval_ratio,
                    seed=a.seed, controversial_only=a.controversial_only)
    except DensehfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"UltraFeedback-{a.variant} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
