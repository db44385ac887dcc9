"""What `--validate_only` prints: rows read, kept, truncated, skipped and why, lengths, steps.

The numbers come from the `stats.json` the data build writes, so a check and the
training run that follows it agree (and the run reuses the check's cache).
"""
from __future__ import annotations



def length_stats(examples: list[dict]) -> dict:
    """Token length of each example (its longest id sequence): min, mean, p50, p95, max."""
    lengths = sorted(max((len(v) for k, v in ex.items() if k.endswith("ids")), default=0) for ex in examples)
    if not lengths:
        return {}
    at = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    return {"min": lengths[0], "mean": round(sum(lengths) / len(lengths), 1), "p50": at(0.5),
            "p95": at(0.95), "max": lengths[-1]}


def planned_steps(cfg, n_train: int, world: int) -> str:
    """The run's optimizer steps, as the stage will compute them; an error if there are none."""
    if hasattr(cfg, "per_device_generation_batch_size"):  # stage 3: a step per generation batch
        from common.trainer import plan_rollout_steps
        steps = plan_rollout_steps(cfg, n_train, world)
        return f"{steps} steps of {cfg.per_device_generation_batch_size} prompts x {world} processes"
    from common.trainer import plan_steps
    steps = plan_steps(cfg, n_train, world)
    return (f"{steps} optimizer steps of {cfg.per_device_train_batch_size} rows x {world} processes "
            f"x {cfg.gradient_accumulation_steps} accumulation")


def format_report(stats: dict, schema: str, stage: int, max_len: int, steps: str) -> str:
    lines = [f"data check: stage {stage}, {schema} rows from {', '.join(stats['sources'])}"]
    for spec, shape in stats.get("shapes", {}).items():
        lines.append(f"  {spec}: read as {shape}")
    for split in ("train", "eval"):
        skipped = {k.split(": ", 1)[1]: v for k, v in stats["skipped"].items() if k.startswith(split)}
        lines.append(f"  {split}: {stats['rows'][split]} rows, {stats[split]} examples kept, "
                     f"{stats['truncated'][split]} truncated to {max_len} tokens, "
                     f"{stats['duplicates'][split]} duplicates, skipped: "
                     + (", ".join(f"{v} {k}" for k, v in skipped.items()) or "none"))
        if stats["lengths"][split]:
            lines.append(f"  {split} tokens per example: "
                         + ", ".join(f"{k} {v}" for k, v in stats["lengths"][split].items()))
    lines.append(f"  plan: {steps}")
    lines.append("data OK (--validate_only: nothing trained)")
    return "\n".join(lines)
