"""The report's numbers, from CSV rows (one per run and eval step): curves over seeds, the
ABC paper's headline metric (first step reaching sparse's best mean reward) and the dropout front."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional


@dataclass
class Curve:
    steps: list[int]
    mean: list[float]
    se: list[float]     # standard error of the mean over seeds (0 with one seed)
    seeds: int


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def by(rows: list[dict], key: str) -> dict[str, list[dict]]:
    """Rows grouped by `key`, in first-seen order."""
    out = defaultdict(list)
    for r in rows:
        out[r[key]].append(r)
    return dict(out)


def common_seeds(rows: list[dict], key: str) -> list[dict]:
    """The rows of the seeds that every group (by `key`) has: a partial grid's means over unequal
    seed sets would mix the seeds' own offsets (each seed also samples its evaluation differently)."""
    seeds = set.intersection(*({r["seed"] for r in group} for group in by(rows, key).values()))
    return [r for r in rows if r["seed"] in seeds]


def curve(rows: list[dict], metric: str) -> Curve:
    """Mean and standard error over the runs at each eval step (the rows of one configuration)."""
    at = defaultdict(list)
    for r in rows:
        at[int(r["step"])].append(float(r[metric]))
    steps = sorted(at)
    stats = [mean_se(at[s]) for s in steps]
    return Curve(steps, [m for m, _ in stats], [e for _, e in stats], len({r["run_id"] for r in rows}))


def first_reaching(c: Curve, target: float) -> Optional[int]:
    """The first eval step whose mean is at least `target`; None if none is."""
    return next((s for s, m in zip(c.steps, c.mean) if m >= target - 1e-12), None)


def finals(rows: list[dict], metric: str) -> list[float]:
    """Each run's value at its last eval step."""
    return [float(max(runs, key=lambda r: int(r["step"]))[metric]) for runs in by(rows, "run_id").values()]


def headline_table(rows: list[dict], metric: str = "gold_reward", reference: str = "sparse") -> list[dict]:
    """Per calculator: mean over all eval steps, final value, first step reaching the reference
    calculator's maximum mean (and that step over the reference's own first step at its maximum)."""
    curves = {calc: curve(r, metric) for calc, r in by(rows, "calculator").items()}
    ref = curves.get(reference)
    target = max(ref.mean) if ref else None
    ref_step = first_reaching(ref, target) if ref else None
    table = []
    for calc, c in curves.items():
        final, final_se = mean_se(finals(by(rows, "calculator")[calc], metric))
        step = first_reaching(c, target) if ref else None
        table.append({"calculator": calc, "seeds": c.seeds, "mean_all_steps": sum(c.mean) / len(c.mean),
                      "final": final, "final_se": final_se, "first_step": step,
                      "fraction": step / ref_step if step is not None and ref_step else None})
    return table


def front(points: list[dict], x: str, y: str) -> list[dict]:
    """Points not dominated by another with higher-or-equal `x` and `y` (both are maximised)."""
    def dominated(p):
        return any(q[x] >= p[x] and q[y] >= p[y] and (q[x], q[y]) != (p[x], p[y]) for q in points)
    return sorted((p for p in points if not dominated(p)), key=lambda p: p[x])
