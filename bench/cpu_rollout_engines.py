"""Stage 3 with HF `generate` and with vLLM (--rollout_engine vllm) side by side: samples/s of the
whole step and generation tokens/s, ReMax and PPO, on the same prompts and answer lengths.

Each (algorithm, engine) is one worker process (in-process vLLM takes over torch's thread
settings for good), running one stage 3 built by `build_models`; batch and answer length change
between steps through the config (as in cpu_scaling.py). Answers are held to their full length
(--min_answer_seq_len = answer length), so both engines decode the same tokens' worth of work. A
step is collect (generation, log-prob forwards, scoring) + train + the weight push (vLLM only).
Workers run hf, vllm, hf, vllm, ... in rounds; medians over every timed step.

    python bench/cpu_rollout_engines.py --shape tiny --batches 8 64 --answer_lens 32 128 --steps 3
"""
from __future__ import annotations

import argparse
import time

from harness import Stage3, emit, exit_after_result, n_params, spawn, summarise, worker_or_compare

PHASES = ("step", "generate", "weight_sync", "logprob_forwards", "scoring", "train")
ENGINES = ("hf", "vllm")


def worker(args) -> None:
    algo, engine = args.worker.split(",")
    if args.unseeded:  # the hypothesis under test: vLLM's per-request generators cost at large batches
        from step3_rlhf import vllm_engine
        vllm_engine.request_seed = lambda *_: None
    t0 = time.perf_counter()
    run = Stage3(["--algo", algo, "--reward_calculator", "sparse", "--rollout_engine", engine,
                  "--max_prompt_seq_len", str(args.prompt_len), "--max_answer_seq_len", str(max(args.answer_lens)),
                  "--top_p", str(args.top_p),  # vLLM's KV cache is sized for the largest batch:
                  "--per_device_generation_batch_size", str(max(args.batches)),
                  "--reference_zero_stage", "0", "--reward_zero_stage", "0"], args.shape)
    built = time.perf_counter() - t0
    steps = {}
    for rep in range(-1, args.steps):  # the first round warms up
        for batch, answer in configs(args):
            run.cfg.max_answer_seq_len = run.cfg.min_answer_seq_len = answer
            run.cfg.per_device_generation_batch_size = run.cfg.per_device_training_batch_size = batch
            out = run.step(run.prompts(batch, args.prompt_len), seed=max(rep, 0))
            if rep >= 0:
                steps.setdefault(f"{batch}x{answer}", []).append(out)
    emit({"build_seconds": built, "steps": steps})
    exit_after_result()


def configs(args) -> list[tuple[int, int]]:
    return [(b, n) for b in args.batches for n in args.answer_lens]


def compare(argv: list[str]) -> dict:
    args = parser().parse_args(argv)
    raw: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for algo in args.algos:
            for engine in ENGINES:
                raw.setdefault((algo, engine), []).append(
                    spawn(__file__, ["--worker", f"{algo},{engine}", *argv], timeout=args.timeout))
    rows = []
    for algo in args.algos:
        for batch, answer in configs(args):
            row = {"algo": algo, "batch": batch, "answer_len": answer}
            for engine in ENGINES:
                steps = [s for r in raw[algo, engine] for s in r["steps"][f"{batch}x{answer}"]]
                row[engine] = {"seconds": {ph: summarise([s.get(ph, 0.0) for s in steps]) for ph in PHASES},
                               "samples_per_s": summarise([batch / s["step"] for s in steps]),
                               "generation_tokens_per_s": summarise([s["generated_tokens"] / s["generate"]
                                                                     for s in steps]),
                               "generated_tokens": steps[0]["generated_tokens"],
                               "build_seconds": [r["build_seconds"] for r in raw[algo, engine]]}
            row["vllm_over_hf"] = {k: row["vllm"][k]["median"] / row["hf"][k]["median"]
                                   for k in ("samples_per_s", "generation_tokens_per_s")}
            rows.append(row)
    return {"shape": args.shape, "parameters": n_params(args.shape), "calculator": "sparse", "top_p": args.top_p,
            "unseeded": args.unseeded, "prompt_len": args.prompt_len, "rounds": args.rounds,
            "steps_per_round": args.steps, "configs": rows}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny")
    p.add_argument("--algos", nargs="+", default=["remax", "ppo"])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    p.add_argument("--answer_lens", type=int, nargs="+", default=[32, 128])
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration and worker")
    p.add_argument("--rounds", type=int, default=1, help="worker processes per (algorithm, engine)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker (a result printed is kept)")
    p.add_argument("--top_p", type=float, default=0.9,
                   help="nucleus sampling (stage 3's default 0.9; under 1.0 vLLM's CPU sampler sorts the vocabulary "
                        "of every row, greedy rows too, at every step)")
    p.add_argument("--unseeded", action="store_true",
                   help="vLLM requests without per-request seeds (not resumable: a measurement of their cost)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench/results/cpu_rollout_engines.json")
    return p


def main(argv=None) -> None:
    worker_or_compare(parser, worker, compare, argv)


if __name__ == "__main__":
    main()
