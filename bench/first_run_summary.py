"""The table at the end of bench/gpu_first_run.sh, from its results.jsonl (a part that failed or
timed out shows as such; whatever it wrote before still counts).

    python bench/first_run_summary.py bench/results/first_run/results.jsonl
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

GB = 2**30


def dig(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def num(v, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    return "-" if v is None else fmt.format(v / scale)


def stage3_cells(result: dict) -> list[str]:
    cells = []
    for algo, a in (dig(result, "stage3", "algos") or {}).items():
        step = dig(a, "seconds", "step", "median")
        split = ", ".join(f"{ph} {num(dig(a, 'seconds', ph, 'median'), '{:.1f}')} s"
                          for ph in ("generate", "logprob_forwards", "scoring", "train"))
        cells.append(f"{algo}: {num(dig(a, 'samples_per_s', 'median'))} samples/s, step {num(step, '{:.1f}')} s "
                     f"({split}); GPU peak {num(dig(a, 'memory_bytes', 'cuda_max_allocated_bytes', 'median'), '{:.1f}', GB)}"
                     f" GiB allocated, {num(dig(a, 'memory_bytes', 'cuda_max_reserved_bytes', 'median'), '{:.1f}', GB)}"
                     f" reserved; host peak {num(dig(a, 'memory_bytes', 'peak_rss_bytes', 'median'), '{:.1f}', GB)} GiB")
    ratio = dig(result, "stage3", "remax_over_ppo")
    if ratio:
        cells.append(f"ReMax / PPO: GPU memory {num(ratio.get('cuda_max_allocated_bytes'))}, "
                     f"step time {num(ratio.get('step_time'))}")
    return cells


def train_cells(result: dict) -> list[str]:
    cells = []
    for kind, m in (result.get("models") or {}).items():
        cells.append(f"{kind}: {num(dig(m, 'tokens_per_s', 'median'), '{:.0f}')} tokens/s, MFU "
                     f"{num(dig(m, 'mfu', 'median'), '{:.1%}')} (6N) / {num(dig(m, 'mfu_8n', 'median'), '{:.1%}')} (8N), "
                     f"GPU peak {num(m.get('peak_memory_bytes'), '{:.1f}', GB)} GiB allocated, "
                     f"{num(m.get('peak_reserved_bytes'), '{:.1f}', GB)} reserved")
    return cells


def summary(lines: list[dict]) -> str:
    out = ["| part | exit | seconds | numbers |", "|---|---|---|---|"]
    for line in lines:
        r = line.get("result") or {}
        if line["part"] == "machine":
            cells = [f"{r.get('gpu', '-')}; torch {r.get('torch', '-')} (CUDA {r.get('cuda', '-')}), "
                     f"deepspeed {r.get('deepspeed', '-')}, disk free {r.get('disk_free_gb', '-')} GB"] if r else []
        elif line["part"] == "models":
            cells = [f"built in {', '.join(f'{k[:-8]} {v} s' for k, v in r.items() if k.endswith('_seconds'))}"] if r else []
        elif "stage3" in r:
            cells = stage3_cells(r)
        else:
            cells = train_cells(r)
        status = "timed out" if line.get("timed_out") else str(line["rc"])
        out.append(f"| {line['part']} | {status} | {line['seconds']} | {'<br>'.join(cells) or 'no result'} |")
    return "\n".join(out)


if __name__ == "__main__":
    rows = [json.loads(x) for x in Path(sys.argv[1]).read_text().splitlines() if x.strip()]
    print(summary(rows))
