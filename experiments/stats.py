"""The report's numbers, from CSV rows (one per run and eval step): curves over seeds, steps to
reach a fixed fraction of the best reward any configuration reached (smoothed, with a bootstrap
interval over seeds) and the dropout front."""
from __future__ import annotations

import math
import random
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


def first_reaching(steps: list[int], values: list[float], target: float) -> Optional[int]:
    """The first eval step whose value is at least `target`; None if none is."""
    return next((s for s, v in zip(steps, values) if v >= target - 1e-12), None)


def finals(rows: list[dict], metric: str) -> list[float]:
    """Each run's value at its last eval step."""
    return [float(max(runs, key=lambda r: int(r["step"]))[metric]) for runs in by(rows, "run_id").values()]


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` eval points (causal: a step never sees later ones)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


@dataclass
class Speed:
    target: float                   # start + fraction * (best - start) of the smoothed mean curves
    start: float
    best: float
    rows: list[dict]                # one per calculator


def speed_table(rows: list[dict], metric: str, reference: str = "sparse", fraction: float = 0.9,
                window: int = 3, resamples: int = 2000, seed: int = 0) -> Speed:
    """How fast each calculator learns: the first step at which its smoothed mean curve reaches
    `fraction` of the way from the start to the best smoothed mean any calculator reached, and that
    step over the reference's, with a 95% bootstrap interval (seeds resampled with replacement in
    each calculator; a resample that never reaches the target counts as infinitely slow).

    The ABC paper's "first step reaching sparse's maximum" used the maximum of sparse's own noisy
    curve, which favours nothing but sparse's luckiest step; a common target fixes that.
    """
    runs = {calc: [[float(r[metric]) for r in sorted(g, key=lambda r: int(r["step"]))]
                   for g in by(group, "run_id").values()] for calc, group in by(rows, "calculator").items()}
    steps = sorted({int(r["step"]) for r in rows})
    if any(len(v) != len(steps) for curves in runs.values() for v in curves):
        raise ValueError(f"{metric}: every run needs every eval step {steps}")

    def raw_mean(curves: list[list[float]]) -> list[float]:
        return [sum(c[i] for c in curves) / len(curves) for i in range(len(steps))]

    def mean_curve(curves: list[list[float]]) -> list[float]:
        return smoothed(raw_mean(curves), window)

    full = {calc: mean_curve(curves) for calc, curves in runs.items()}
    start = sum(c[0] for curves in runs.values() for c in curves) / sum(map(len, runs.values()))
    best = max(max(c) for c in full.values())
    target = start + fraction * (best - start)
    reached = {calc: first_reaching(steps, c, target) for calc, c in full.items()}
    rng = random.Random(seed)
    ratios: dict[str, list[float]] = {calc: [] for calc in runs}
    for _ in range(resamples if reference in runs else 0):
        at = {calc: first_reaching(steps, mean_curve([rng.choice(curves) for _ in curves]), target)
              for calc, curves in runs.items()}
        ref = at[reference]
        for calc, step in at.items():
            if ref is None and step is not None:    # the reference never got there: infinitely faster
                ratios[calc].append(0.0)
            elif ref:                                # (both never, or the reference at step 0: no ratio)
                ratios[calc].append(math.inf if step is None else step / ref)
    out = []
    for calc, curves in runs.items():
        final, final_se = mean_se([c[-1] for c in curves])
        ref = reached.get(reference)
        r = sorted(ratios[calc])
        out.append({"calculator": calc, "seeds": len(curves), "mean_all_steps": sum(raw_mean(curves)) / len(steps),
                    "final": final, "final_se": final_se, "step": reached[calc],
                    "ratio": reached[calc] / ref if reached[calc] is not None and ref else None,
                    # resampling one seed gives that seed back: no interval without two on both sides
                    "ci": (r[int(0.025 * (len(r) - 1))], r[math.ceil(0.975 * (len(r) - 1))])
                    if r and len(curves) > 1 and len(runs[reference]) > 1 else None})
    return Speed(target, start, best, out)


def paired_gains(rows: list[dict], metric: str, reference: str = "sparse") -> dict[str, tuple]:
    """Each calculator's mean over all eval steps minus the reference's, seed by seed: a seed fixes the
    start and the prompts' order for every calculator, so a pair shares them and its difference is free
    of the seed's own offset. As (mean, SE, seeds ahead, seeds paired)."""
    values = defaultdict(list)
    for r in rows:
        values[r["calculator"], r["seed"]].append(float(r[metric]))
    run_mean = {key: sum(v) / len(v) for key, v in values.items()}
    out = {}
    for calc in by(rows, "calculator"):
        diffs = [m - run_mean[reference, seed] for (c, seed), m in run_mean.items()
                 if c == calc and (reference, seed) in run_mean]
        if calc != reference and diffs:
            out[calc] = (*mean_se(diffs), sum(d > 0 for d in diffs), len(diffs))
    return out


def front(points: list[dict], x: str, y: str) -> list[dict]:
    """Points not dominated by another with higher-or-equal `x` and `y` (both are maximised)."""
    def dominated(p):
        return any(q[x] >= p[x] and q[y] >= p[y] and (q[x], q[y]) != (p[x], p[y]) for q in points)
    return sorted((p for p in points if not dominated(p)), key=lambda p: p[x])
