"""Generation under ZeRO-3: gather the actor once per `generate` (densehf's `gathered`)
vs DeepSpeed's default, whose module hooks gather each layer at every decoding step.

Both variants run the real `RolloutEngine.generate` of a stage 3 built with
`--actor_zero_stage 3`; the default is obtained by making `strategy.gathered` a
pass-through. Greedy decoding, so both produce the same tokens (checked). Calls
alternate, and rank 0 writes tokens/s (batch x new tokens per rank / seconds).

    deepspeed --num_gpus 2 bench/zero3_generation.py --shape small --batch 4 --answer_len 32 --repeats 5
"""
from __future__ import annotations

import argparse
import torch

from harness import Stage3, default_zero3_gathering, n_params, summarise, timed_generate, write_result


def main(argv=None) -> None:
    from common.data.batches import pad
    from common.strategy import close_distributed
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--answer_len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench/results/zero3_generation.json")
    p.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    run = Stage3(["--actor_zero_stage", "3", "--max_answer_seq_len", str(args.answer_len)], args.shape)
    rows = run.prompts(args.batch, args.prompt_len, seed=run.strategy.rank)  # ranks differ, as in training
    ids, mask = pad([r["input_ids"] for r in rows], run.tokenizer.pad_token_id, side="left")
    engine = run.models.rollout

    def generate(variant: str) -> tuple[float, torch.Tensor]:
        if variant == "gather_once":
            return timed_generate(engine, ids, mask)
        with default_zero3_gathering(run.strategy):
            return timed_generate(engine, ids, mask)

    variants = ("gather_once", "per_layer_default")
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    outputs = {}
    for rep in range(-1, args.repeats):  # the first round warms up
        for v in variants:
            t, outputs[v] = generate(v)
            if rep >= 0:
                seconds[v].append(t)
    new_tokens = args.batch * (outputs["gather_once"].shape[1] - ids.shape[1])
    tok_s = {v: summarise([new_tokens / t for t in s]) for v, s in seconds.items()}
    result = {"shape": args.shape, "parameters": n_params(args.shape), "ranks": run.strategy.world_size,
              "batch_per_rank": args.batch, "prompt_len": args.prompt_len, "new_tokens_per_rank": new_tokens,
              "repeats": args.repeats, "same_tokens": torch.equal(outputs["gather_once"], outputs["per_layer_default"]),
              "seconds": {v: summarise(s) for v, s in seconds.items()}, "tokens_per_s_per_rank": tok_s,
              "speedup_gather_once": summarise([d / g for g, d in zip(seconds["gather_once"],
                                                                       seconds["per_layer_default"])])}
    if run.strategy.is_main:
        write_result(args.out, result)
    close_distributed(skip_finalizers=True)  # after the per-layer baseline


if __name__ == "__main__":
    main()
