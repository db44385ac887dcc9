"""Whole stage-3 steps per reward calculator (sparse, abc, abc_d, tlcr): is dense reward free?

The ABC paper's target is <= 2% overhead over sparse. Each calculator gets its own
stage 3 built by `build_models` from the same random-weight folders; the actor's learning
rate is 0 so all actors stay identical and, seeded per repetition, generate the same
samples. Steps run round-robin over the calculators (machine noise hits all alike);
medians and spread of the whole step, of its scoring part (reward-model call,
discriminator, policy attention, calculator) and of the log-prob forwards (where ABC-D
captures the actor's attention) are reported as ratios to sparse, paired by repetition.
The overhead of a calculator is what it adds to those two parts (generation and training
do not depend on it), as a share of sparse's whole step.

    python bench/cpu_calculators.py --shape small --batch 8 --prompt_len 16 --answer_len 64 --repeats 10
"""
from __future__ import annotations

import argparse

from harness import SCORING, Stage3, n_params, summarise, write_result

CALCULATORS = ("sparse", "abc", "abc_d", "tlcr")
RATIOS = ("step", "scoring", "logprob_forwards")


def _reward_path(x: dict) -> float:
    return x["scoring"] + x["logprob_forwards"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small")
    p.add_argument("--algo", default="remax")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--answer_len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--calculators", nargs="+", default=list(CALCULATORS))
    p.add_argument("--out", default="bench/results/cpu_calculators.json")
    args = p.parse_args(argv)
    flags = ["--algo", args.algo, "--max_answer_seq_len", args.answer_len, "--actor_learning_rate", 0,
             "--per_device_generation_batch_size", args.batch, "--per_device_training_batch_size", args.batch,
             "--reference_zero_stage", 0, "--reward_zero_stage", 0]
    runs, strategy = {}, None
    for name in args.calculators:
        runs[name] = Stage3([*map(str, flags), "--reward_calculator", name], args.shape, strategy)
        strategy = runs[name].strategy
    rows = runs[args.calculators[0]].prompts(args.batch, args.prompt_len)
    samples: dict[str, list[dict]] = {n: [] for n in runs}
    for rep in range(-args.warmup, args.repeats):
        for name, run in runs.items():
            out = run.step(rows, seed=max(rep, 0))
            if rep >= 0:
                samples[name].append(out)
    base = args.calculators[0]
    phases = ("step", "scoring", "generate", "logprob_forwards", "train", *SCORING)
    result = {"shape": args.shape, "parameters": n_params(args.shape), "algo": args.algo, "batch": args.batch,
              "prompt_len": args.prompt_len, "answer_len": args.answer_len, "repeats": args.repeats,
              "response_tokens": {n: s[0]["response_tokens"] for n, s in samples.items()},
              "seconds": {n: {ph: summarise([x.get(ph, 0.0) for x in s]) for ph in phases} for n, s in samples.items()}}
    # per repetition: the same samples and machine state, so the paired ratio has the least noise
    result["ratio_vs_" + base] = {
        n: {ph: summarise([x[ph] / b[ph] for x, b in zip(s, samples[base])]) for ph in RATIOS}
        for n, s in samples.items()}
    result["overhead_share_of_step"] = {
        n: summarise([(_reward_path(x) - _reward_path(b)) / b["step"] for x, b in zip(s, samples[base])])
        for n, s in samples.items()}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
