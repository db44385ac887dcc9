"""Launched by test_faults.py under `deepspeed --num_gpus 2`: a skipped update leaves a
DeepSpeed engine exactly as it was.

For each (ZeRO stage, accumulation) two engines start from the same weights and train
on the same good micro-batches; the first also meets, between them, a micro-batch
whose loss is NaN on rank 1 only. Both ranks must skip it (else ZeRO's collectives
would diverge) and the two engines must end bit-identical: weights, optimizer state
and DeepSpeed's step counters. In "replace" cases the next micro-batch takes the skipped
one's place (the supervised loop); in "within" cases the update goes on with the others
(stage 3's rollout micro-batches), and the clean engine meets that micro-batch with its
loss times zero instead. Prints one JSON line from rank 0: PROBE {...}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

# (zero stage, gradient accumulation steps, what follows a skipped micro-batch)
CASES = [(0, 1, "replace"), (2, 2, "replace"), (3, 1, "replace"), (3, 2, "replace"), (2, 3, "within"),
         (3, 3, "within")]


def tensors(obj, prefix="") -> dict:
    """Every tensor in a nested state dict, by path (for bit-exact comparison)."""
    if torch.is_tensor(obj):
        return {prefix: obj.detach().cpu().clone()}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out = {}
    for k, v in items:
        out.update(tensors(v, f"{prefix}/{k}"))
    return out


def train(cfg, strategy, model_path: str, nan_at: int | None, n_good: int, within: bool, skipping: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from common.guard import NonFiniteGuard, poison
    from common.models import load_model
    from common.strategy import seed_everything
    from common.update import Accumulation
    seed_everything(cfg.seed)
    engine = strategy.prepare(load_model(cfg, strategy, AutoModelForCausalLM, model_path), total_steps=8)
    engine.train()
    guard = NonFiniteGuard(strategy, max_bad=3)
    gas = cfg.gradient_accumulation_steps
    update = Accumulation(strategy, engine, guard, n_good + 1 if within else gas)
    initial = strategy.full_state_dict(engine)
    data = torch.Generator().manual_seed(100 + strategy.rank)
    order = [(torch.randint(3, 200, (2, 16), generator=data), False) for _ in range(n_good)]
    if skipping or within:
        order.insert(nan_at, (torch.randint(3, 200, (2, 16), generator=data), True))
    skipped = []
    for i, (ids, bad) in enumerate(order):
        loss = engine(input_ids=ids, labels=ids).loss
        if bad and skipping and strategy.rank == 1:
            loss = poison(loss)
        elif bad:  # the clean engine of a "within" case: the micro-batch is there, with no weight
            loss = loss * 0
        if not update.add(loss):
            skipped.append(i)
        elif update.full:
            update.step()
    if within:
        update.step()
    return {"weights": strategy.full_state_dict(engine), "initial": initial, "skipped": skipped,
            "optimizer": tensors(engine.optimizer.state_dict()),
            "counters": [engine.global_steps, engine.micro_steps, engine.get_lr()[0]]}


def same(a: dict | None, b: dict | None) -> bool:
    return a is None and b is None or a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    from common.config import SupervisedConfig, parse_config
    from common.strategy import DeepSpeedStrategy, close_distributed
    model_path = sys.argv[-1]  # the launcher puts --local_rank first
    result = {}
    strategy = None
    for zero, gas, follows in CASES:
        cfg = parse_config(SupervisedConfig, ["--model_name_or_path", model_path, "--zero_stage", str(zero),
                                              "--gradient_accumulation_steps", str(gas), "--learning_rate", "1e-3",
                                              "--per_device_train_batch_size", "2", "--num_warmup_steps", "0"])
        if strategy is None:
            strategy = DeepSpeedStrategy(cfg)
            strategy.setup_distributed()
        strategy.cfg = cfg
        within = follows == "within"
        skipping = train(cfg, strategy, model_path, nan_at=1, n_good=2 * gas, within=within, skipping=True)
        clean = train(cfg, strategy, model_path, nan_at=1, n_good=2 * gas, within=within, skipping=False)
        result[f"zero{zero}_gas{gas}_{follows}"] = {
            "skipped": skipping["skipped"], "clean_skipped": clean["skipped"],
            "weights_equal": same(skipping["weights"], clean["weights"]),
            "optimizer_equal": same(skipping["optimizer"], clean["optimizer"]),
            "counters": [skipping["counters"], clean["counters"]],
            "trained": not same(clean["weights"], clean["initial"])}
    gathered = [None] * strategy.world_size
    torch.distributed.all_gather_object(gathered, result)  # optimizer shards differ by rank
    if strategy.is_main:
        print("PROBE " + json.dumps(gathered), flush=True)
    close_distributed()


if __name__ == "__main__":
    main()
