"""The stage-3 algorithms side by side: peak memory and step time on the same model, prompts
and answer length. A variant is an `--algo` name, with `@k` for k answers per prompt
(`--num_generations`): `remax ppo grpo@2 rloo@4`. Samples/s counts answers trained on.

Memory is a process's own high-water mark, so each algorithm runs in its own
subprocess (the `--worker` mode): RSS once the code is imported, after the models are
built, and its peak (getrusage ru_maxrss) after the steps; on a GPU also the CUDA
allocator's peak. Subprocesses alternate A, B, A, B, ... for `--rounds` rounds so that
machine noise hits both; step times are medians over every timed step of every round.
bench/gpu_stage3.py runs the same comparison with the Llama-2-7B recipes.

    python bench/algos.py --shape small --batch 8 --answer_len 64 --rounds 3 --steps 3
    python bench/algos.py --shape tiny --batch 8 --answer_len 32 --algos remax ppo grpo@2 rloo@2 grpo@4 rloo@4
"""
from __future__ import annotations

import argparse
from pathlib import Path

from harness import Stage3, emit, exit_after_result, n_params, peak_memory, spawn, summarise, worker_or_compare

PHASES = ("step", "generate", "logprob_forwards", "critic_values", "scoring", "train")


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def worker(args) -> None:
    import deepspeed  # noqa: F401  (imports count in the baseline, not in the models)
    import step3_rlhf.models  # noqa: F401
    before = rss()
    run = Stage3(stage3_flags(args, args.worker), args.shape)
    built = rss()
    rows = run.prompts(args.batch, args.prompt_len)
    steps = [run.step(rows, seed=i) for i in range(args.warmup + args.steps)][args.warmup:]
    emit({"rss_before_build": before, "rss_after_build": built, **peak_memory(), "steps": steps})
    exit_after_result()


def stage3_flags(args, variant: str) -> list[str]:
    """The same stage-3 settings for every variant ("grpo@4": --algo grpo --num_generations 4): a
    recipe's YAML if given, then `--extra`. A micro-batch holds --train_batch answers (default:
    one prompt's worth of --batch, times k)."""
    algo, _, k = variant.partition("@")
    k = int(k or 1)
    recipe = ["--config", str(Path(args.recipe_dir) / f"{algo}.yaml")] if args.recipe_dir else []
    return [*recipe, "--algo", algo, "--reward_calculator", args.calculator, "--num_generations", str(k),
            "--max_prompt_seq_len", str(args.prompt_len), "--max_answer_seq_len", str(args.answer_len),
            "--per_device_generation_batch_size", str(args.batch),
            "--per_device_training_batch_size", str(args.train_batch or args.batch * k), *args.extra]


def compare(argv: list[str]) -> dict:
    args = parser().parse_args(argv)
    raw: dict[str, list[dict]] = {a: [] for a in args.algos}
    for _ in range(args.rounds):
        for algo in args.algos:
            raw[algo].append(spawn(__file__, ["--worker", algo, *argv], timeout=args.timeout))
    result = {"shape": args.shape, "parameters": n_params(args.shape), "batch": args.batch,
              "train_batch": args.train_batch or args.batch, "prompt_len": args.prompt_len,
              "answer_len": args.answer_len, "calculator": args.calculator, "recipe_dir": args.recipe_dir,
              "extra_flags": args.extra, "rounds": args.rounds, "steps_per_round": args.steps, "algos": {}}
    for algo, runs in raw.items():
        steps = [s for r in runs for s in r["steps"]]
        result["algos"][algo] = {
            "memory_bytes": {k: summarise([r[k] for r in runs]) for k in runs[0] if k not in ("steps", "worker_ended")},
            "workers_ended": [r["worker_ended"] for r in runs if "worker_ended" in r],  # crashed after their result
            "seconds": {ph: summarise([s.get(ph, 0.0) for s in steps]) for ph in PHASES},
            "samples_per_s": summarise([s["answers"] / s["step"] for s in steps])}
    if len(args.algos) == 2:
        a, b = (result["algos"][x] for x in args.algos)
        med = lambda side, *keys: _dig(side, *keys)["median"]  # noqa: E731
        ratio = {"step_time": med(a, "seconds", "step") / med(b, "seconds", "step")}
        for key in ("peak_rss_bytes", "cuda_max_allocated_bytes", "cuda_max_reserved_bytes"):
            if key in a["memory_bytes"]:
                ratio[key] = med(a, "memory_bytes", key) / med(b, "memory_bytes", key)
        ratio["peak_rss_above_imports"] = (
            (med(a, "memory_bytes", "peak_rss_bytes") - med(a, "memory_bytes", "rss_before_build"))
            / (med(b, "memory_bytes", "peak_rss_bytes") - med(b, "memory_bytes", "rss_before_build")))
        result["{}_over_{}".format(*args.algos)] = ratio
    return result


def _dig(d: dict, *keys):
    for k in keys:
        d = d[k]
    return d


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small")
    p.add_argument("--algos", nargs="+", default=["remax", "ppo"], help="variants: algo or algo@k")
    p.add_argument("--calculator", default="sparse")
    p.add_argument("--batch", type=int, default=8, help="prompts per step")
    p.add_argument("--train_batch", type=int, default=0, help="micro-batch (default: --batch)")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--answer_len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per subprocess")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--recipe_dir", default="", help="folder of {algo}.yaml recipes (e.g. training_scripts/llama2_7b)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=["--reference_zero_stage", "0", "--reward_zero_stage", "0"],
                   help="stage-3 flags for both algorithms (last on the command line)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker (a result printed is kept)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench/results/cpu_algos.json")
    return p


def main(argv=None) -> None:
    worker_or_compare(parser, worker, compare, argv)


if __name__ == "__main__":
    main()
