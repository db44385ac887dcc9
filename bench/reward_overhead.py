"""Cost of dense rewards at scoring time: sparse vs ABC (last-layer capture) vs naive ABC.

The ABC paper calls its dense reward "free": the attention map comes from the reward
model's forward pass that runs anyway. Asking transformers for it (`output_attentions`)
switches every layer to eager attention; densehf recomputes one row of the last layer
from hooked projections instead. This measures the three side by side, interleaved
(round-robin) so machine noise hits all alike, and reports medians and ratios.

    python bench/reward_overhead.py --model tiny --batch 16 --prompt_len 16 --response_len 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from common.heads import last_token_index, position_ids
from common.models import resolve_model_path
from common.rewards import RewardInputs, compute_rewards
from step3_rlhf.scoring import RewardScorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="reward-model backbone: preset, folder or hub name")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--response_len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--out", default="bench/results/reward_overhead.json")
    args = p.parse_args()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = resolve_model_path(args.model)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tok = AutoTokenizer.from_pretrained(path)
    load = dict(num_labels=1, dtype=dtype)
    fast = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="sdpa", **load)
    eager = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager", **load)
    eager.load_state_dict(fast.state_dict())  # the same (randomly initialised) score head
    for m in (fast, eager):
        m.to(args.device).eval()
        m.module = m  # RewardScorer expects an engine-like object
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, len(tok), (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    responses = [torch.randint(5, len(tok), (args.response_len,), generator=g).tolist() for _ in range(args.batch)]
    texts = [""] * args.batch
    cfg = SimpleNamespace(abc_beta=0.8, reward_calculator="sparse", tlcr_add_sequence_reward=False)
    sparse_scorer = RewardScorer(fast, tok, tok, "raw", want_attention=False)
    abc_scorer = RewardScorer(fast, tok, tok, "raw", want_attention=True)
    mask = torch.ones(args.batch, args.response_len)

    def sparse():
        scores, _ = sparse_scorer(texts, prompts, responses, args.response_len)
        return compute_rewards(RewardInputs(mask, scores), SimpleNamespace(**{**vars(cfg), "reward_calculator": "sparse"}))

    def abc_last_layer():
        scores, attn = abc_scorer(texts, prompts, responses, args.response_len)
        return compute_rewards(RewardInputs(mask, scores, attn), SimpleNamespace(**{**vars(cfg), "reward_calculator": "abc"}))

    def abc_all_eager():
        inp = sparse_scorer.inputs(texts, prompts, responses)
        ids, m = sparse_scorer.batch(inp)
        with torch.no_grad():
            backbone = eager.model(input_ids=ids, attention_mask=m, position_ids=position_ids(m), output_attentions=True)
            scores = eager.score(backbone.last_hidden_state).squeeze(-1)
            scores = scores.gather(1, last_token_index(m)[:, None]).squeeze(1).float().cpu()
            rows = backbone.attentions[-1].mean(1)
            rows = rows[torch.arange(ids.shape[0]), last_token_index(m)]
        attn = sparse_scorer.to_policy(rows, inp, args.response_len, mean=False)
        return compute_rewards(RewardInputs(mask, scores, attn), SimpleNamespace(**{**vars(cfg), "reward_calculator": "abc"}))

    fns = {"sparse": sparse, "abc_last_layer": abc_last_layer, "abc_all_layers_eager": abc_all_eager}
    torch.testing.assert_close(abc_last_layer(), abc_all_eager(), rtol=1e-3, atol=1e-4)  # same rewards
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(2):
        for fn in fns.values():
            fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in fns.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "device": args.device, "dtype": args.dtype, "batch": args.batch,
              "prompt_len": args.prompt_len, "response_len": args.response_len, "repeats": args.repeats,
              "median_seconds": med,
              "ratio_vs_sparse": {k: v / med["sparse"] for k, v in med.items()},
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
