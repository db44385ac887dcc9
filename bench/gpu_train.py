"""SFT and reward-model training on one GPU: tokens/s and model FLOPs utilisation (MFU).

A Llama-2-7B-shaped model (random weights: speed and memory do not depend on them) is
trained with the stages' own losses (stage 1 `token_nll`, stage 2 `pair_scores` +
Bradley-Terry) on engines that `DeepSpeedStrategy` builds from the published 1-GPU
recipes (training_scripts/llama2_7b: ZeRO-3 + CPU offload, gradient checkpointing, bf16,
micro-batch 4, 8 / 16 accumulation steps, 512 tokens) with sdpa attention; `--extra`
flags go last (e.g. `--extra --no-offload --zero_stage 2`). Each model trains in its own
subprocess. MFU = 6 N tokens/s / peak (H100 SXM and H200: 989 TFLOP/s dense bf16); 6N
counts neither attention nor the recomputation of gradient checkpointing (8N in all),
the usual convention (`mfu_8n` counts them). Reported for the whole optimizer step and for forward+backward
alone (the rest is the optimizer step: offloaded Adam on the CPU).

    python bench/gpu_train.py            # on the GPU machine; installs bench/wheels if deepspeed is missing
    python bench/gpu_train.py --small    # a tiny CPU smoke run of the same code
"""
from __future__ import annotations

import argparse
import sys
import time

from harness import (REPO, emit, ensure_deepspeed, exit_after_result, model_folder, n_params, spawn, summarise, sync,
                     write_result)

RECIPES = {"sft": ("sft.yaml", "causal", 8), "reward": ("reward_model.yaml", "reward", 16)}


def worker(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from common.config import parse_config
    from common.heads import bradley_terry
    from common.models import load_model
    from common.strategy import DeepSpeedStrategy
    yaml, head, gas = RECIPES[args.worker]
    gpu = torch.cuda.is_available()
    path = model_folder(args.shape, head, "cuda" if gpu else "cpu", torch.bfloat16 if gpu else torch.float32)
    flags = ["--config", str(REPO / "training_scripts" / "llama2_7b" / yaml), "--model_name_or_path", path,
             "--zero_stage", "3", "--offload", "--per_device_train_batch_size", str(args.batch),
             "--gradient_accumulation_steps", str(args.gas or gas), "--max_seq_len", str(args.seq_len),
             "--attn_implementation", "sdpa", *args.extra]
    if args.worker == "sft":
        from step1_sft.main import SFTConfig as Config, token_nll
        model_class, seqs = AutoModelForCausalLM, args.batch

        def loss_fn(engine, batch):
            nll, count = token_nll(engine, batch)
            return nll.sum() / count.sum()
    else:
        from step2_reward.main import RewardConfig as Config
        from step2_reward.sequence_rm import pair_scores
        model_class, seqs = AutoModelForSequenceClassification, 2 * args.batch  # chosen + rejected

        def loss_fn(engine, batch):
            return bradley_terry(*pair_scores(engine, batch)).mean()
    cfg = parse_config(Config, flags)
    strategy = DeepSpeedStrategy(cfg)
    strategy.setup_distributed()
    engine = strategy.prepare(load_model(cfg, strategy, model_class), 10**6)
    engine.train()
    ids = torch.randint(4, strategy.module(engine).config.vocab_size, (seqs, args.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    steps = []
    for _ in range(args.warmup + args.steps):
        fwd_bwd = 0.0
        sync()
        t0 = time.perf_counter()
        for _ in range(cfg.gradient_accumulation_steps):
            t1 = time.perf_counter()
            strategy.backward(engine, loss_fn(engine, batch), cfg.gradient_accumulation_steps)
            sync()
            fwd_bwd += time.perf_counter() - t1
        strategy.step(engine)  # the accumulation boundary: Adam runs here
        sync()
        steps.append({"step": time.perf_counter() - t0, "forward_backward": fwd_bwd})
    emit({"tokens_per_step": seqs * args.seq_len * cfg.gradient_accumulation_steps, "flags": flags,
          "steps": steps[args.warmup:], "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if gpu else None,
          "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved() if gpu else None})
    exit_after_result()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shape, short sequences, no offload: a CPU smoke run")
    p.add_argument("--shape", default="llama2_7b")
    p.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="micro-batch (pairs for the reward model)")
    p.add_argument("--gas", type=int, default=0, help="accumulation steps (default: the recipe's)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=None, help="seconds per model's worker (a result printed is kept)")
    p.add_argument("--out", default="bench/results/gpu_train.json")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more stage flags, last")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.small:
        args.shape, args.seq_len, args.batch, args.gas, args.steps = "tiny", 32, 2, 2, 1
        args.extra = ["--no-offload", "--dtype", "fp32", *args.extra]
    ensure_deepspeed()
    if args.worker:
        return worker(args)
    n = n_params(args.shape)
    result = {"shape": args.shape, "parameters": n, "seq_len": args.seq_len, "micro_batch": args.batch,
              "peak_tflops": args.peak_tflops, "models": {}}
    for kind in args.models:
        w = spawn(__file__, ["--worker", kind, "--shape", args.shape, "--seq_len", str(args.seq_len),
                             "--batch", str(args.batch), "--gas", str(args.gas), "--steps", str(args.steps),
                             "--warmup", str(args.warmup), "--extra", *args.extra], timeout=args.timeout)
        tok_s = [w["tokens_per_step"] / s["step"] for s in w["steps"]]
        fb_tok_s = [w["tokens_per_step"] / s["forward_backward"] for s in w["steps"]]
        result["models"][kind] = {
            "flags": w["flags"], "tokens_per_step": w["tokens_per_step"], "peak_memory_bytes": w["cuda_max_allocated_bytes"],
            "peak_reserved_bytes": w.get("cuda_max_reserved_bytes"), "worker_ended": w.get("worker_ended"),
            "seconds_per_step": summarise([s["step"] for s in w["steps"]]), "tokens_per_s": summarise(tok_s),
            "mfu": summarise([6 * n * t / (args.peak_tflops * 1e12) for t in tok_s]),
            # 8N: the forward recomputed by gradient checkpointing counted too (hardware FLOPs)
            "mfu_8n": summarise([8 * n * t / (args.peak_tflops * 1e12) for t in tok_s]),
            "mfu_forward_backward": summarise([6 * n * t / (args.peak_tflops * 1e12) for t in fb_tok_s])}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
