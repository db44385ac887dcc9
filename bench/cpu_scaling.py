"""How a ReMax step (sparse reward) scales with answer length and batch size.

One stage 3 built by `build_models`; the answer length and batch are changed between
steps through the config the rollout engine and the algorithm read. Configurations run
round-robin, medians and spread per configuration; time per response token shows
whether a step is linear in the tokens (fixed overheads make short answers dearer per
token, attention and the KV cache make long ones dearer).

    python bench/cpu_scaling.py --shape small --answer_lens 16 64 256 --batches 4 8 16 --repeats 3
"""
from __future__ import annotations

import argparse

from harness import Stage3, n_params, summarise, write_result

PHASES = ("step", "generate", "logprob_forwards", "scoring", "train")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--answer_lens", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--base_batch", type=int, default=8, help="batch of the answer-length sweep")
    p.add_argument("--base_answer_len", type=int, default=64, help="answer length of the batch sweep")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/cpu_scaling.json")
    args = p.parse_args(argv)
    configs = sorted({(args.base_batch, n) for n in args.answer_lens} | {(b, args.base_answer_len) for b in args.batches})
    run = Stage3(["--algo", "remax", "--reward_calculator", "sparse", "--actor_learning_rate", "0",
                  "--reference_zero_stage", "0", "--reward_zero_stage", "0"], args.shape)
    samples: dict[tuple, list[dict]] = {c: [] for c in configs}
    for rep in range(-1, args.repeats):  # the first round warms up
        for batch, answer in configs:
            run.cfg.max_answer_seq_len = answer
            run.cfg.per_device_generation_batch_size = run.cfg.per_device_training_batch_size = batch
            out = run.step(run.prompts(batch, args.prompt_len), seed=max(rep, 0))
            if rep >= 0:
                samples[batch, answer].append(out)
    rows = []
    for (batch, answer), s in samples.items():
        rows.append({"batch": batch, "answer_len": answer, "response_tokens": s[0]["response_tokens"],
                     "seconds": {ph: summarise([x.get(ph, 0.0) for x in s]) for ph in PHASES},
                     "ms_per_response_token": summarise([1e3 * x["step"] / x["response_tokens"] for x in s])})
    result = {"shape": args.shape, "parameters": n_params(args.shape), "algo": "remax", "calculator": "sparse",
              "prompt_len": args.prompt_len, "repeats": args.repeats, "configs": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
