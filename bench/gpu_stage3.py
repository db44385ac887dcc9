"""Stage 3 on one GPU with a Llama-2-7B-shaped model: ReMax vs PPO, and decode speed.

(1) `bench/algos.py`'s comparison with the published 1-GPU recipes
(training_scripts/llama2_7b/{remax,ppo}.yaml and step3_*_1gpu.sh: every model ZeRO-3,
actor/critic with CPU offload, reference and reward weights on CPU, bf16, gradient
checkpointing, 8 prompts x 256 + 256 tokens, micro-batch 4): samples/s, peak memory
(torch.cuda.max_memory_allocated, each algorithm in its own process) and the split of a
step into generation / log-prob forwards / critic values / scoring / training.
(2) Decode speed against the memory-bandwidth bound: greedy, batch 1, the real
`RolloutEngine.generate` of the actor alone (the other models are not built for it); tokens/s = (n2 - n1) / (t2 - t1) for two answer lengths,
which cancels the once-per-call gather and the prefill. At batch 1 every token reads
all weights (7B in bf16: 13.5 GB), so the bound is HBM bandwidth / weight bytes.

    python bench/gpu_stage3.py              # on the GPU machine; installs bench/wheels if deepspeed is missing
    python bench/gpu_stage3.py --small      # a tiny CPU smoke run of the same code
    python bench/gpu_stage3.py --rollout_engine vllm   # the same with vLLM rollouts (needs vLLM installed)
"""
from __future__ import annotations

import argparse
import statistics
import sys

from harness import (REPO, SPECIALS, ActorOnly, emit, ensure_deepspeed, exit_after_result, n_params, spawn,
                     timed_generate, write_result)

RECIPE_FLAGS = ["--actor_zero_stage", "3", "--critic_zero_stage", "3", "--reference_zero_stage", "3",
                "--reward_zero_stage", "3", "--offload", "--offload_reference_model", "--offload_reward_model"]
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # SXM parts


def decode_worker(args) -> None:
    import torch

    from common.data.batches import pad
    run = ActorOnly(["--config", str(REPO / "training_scripts/llama2_7b/remax.yaml"), *args.flags], args.shape)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(len(SPECIALS), run.strategy.module(run.actor).config.vocab_size, (args.prompt_len,), generator=g).tolist()
    ids, mask = pad([prompt], run.tokenizer.pad_token_id, side="left")
    points = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        for n in args.decode_lens:
            run.cfg.max_answer_seq_len = n
            seconds, out = timed_generate(run.rollout, ids, mask)
            if rep:
                points.setdefault(n, []).append((seconds, out.shape[1] - ids.shape[1]))
    (t1, n1), (t2, n2) = ((statistics.median(s for s, _ in points[n]), points[n][0][1]) for n in args.decode_lens)
    weight_bytes = sum(p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else p.numel() * p.element_size()
                       for p in run.strategy.module(run.actor).parameters())
    emit({"points": {str(n): v for n, v in points.items()}, "decode_tokens_per_s": (n2 - n1) / (t2 - t1),
          "weight_bytes": weight_bytes, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None})
    exit_after_result()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shape, short answers, no offload: a CPU smoke run")
    p.add_argument("--shape", default="llama2_7b")
    p.add_argument("--algos", nargs="+", default=["remax", "ppo"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train_batch", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=256)
    p.add_argument("--answer_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--decode_lens", type=int, nargs=2, default=[32, 160])
    p.add_argument("--repeats", type=int, default=2, help="decode timings per length")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                   help="also time batch-1 decoding (a separate worker that rebuilds the models)")
    p.add_argument("--hbm_tb_s", type=float, default=0.0, help="memory bandwidth (default: by GPU name)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker (a result printed is kept)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench/results/gpu_stage3.json")
    p.add_argument("--rollout_engine", choices=("hf", "vllm"), default="hf", help="added to the stage-3 flags")
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=RECIPE_FLAGS, help="stage-3 flags, last")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.rollout_engine == "vllm":  # the workers get it inside --flags
        args.flags = [*args.flags, "--rollout_engine", "vllm"]
    if args.small:
        args.shape, args.batch, args.train_batch, args.prompt_len, args.answer_len = "tiny", 2, 1, 8, 8
        args.steps, args.decode_lens, args.repeats = 1, [4, 12], 1
        args.flags = [f for f in args.flags if "offload" not in f] + ["--dtype", "fp32"]
    ensure_deepspeed()
    if args.worker:
        return decode_worker(args)
    import algos
    common = ["--shape", args.shape, "--batch", str(args.batch), "--train_batch", str(args.train_batch),
              "--prompt_len", str(args.prompt_len), "--answer_len", str(args.answer_len), "--rounds", "1",
              "--steps", str(args.steps), "--recipe_dir", str(REPO / "training_scripts/llama2_7b"),
              *(["--timeout", str(args.timeout)] if args.timeout else [])]
    result = {"stage3": algos.compare([*common, "--algos", *args.algos, "--extra", *args.flags]),
              "parameters": n_params(args.shape)}
    if not args.decode:
        return write_result(args.out, result)
    d = spawn(__file__, ["--worker", "decode", "--shape", args.shape, "--prompt_len", str(args.prompt_len),
                         "--repeats", str(args.repeats), "--decode_lens", *map(str, args.decode_lens),
                         "--flags", *args.flags], timeout=args.timeout)
    bw = args.hbm_tb_s * 1e12 or next((v for k, v in HBM_BYTES_PER_S.items() if k in (d["gpu"] or "")), None)
    bound = bw / d["weight_bytes"] if bw else None
    result["decode_batch1"] = {**d, "hbm_bytes_per_s": bw, "bandwidth_bound_tokens_per_s": bound,
                               "fraction_of_bound": d["decode_tokens_per_s"] / bound if bound else None}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
