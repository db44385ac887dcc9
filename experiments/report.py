"""The experiment report: CSV of every eval step of every finished run, PNG plots, markdown tables
and README.md. Rebuilt from the run folders alone, so it can be rewritten at any time
(`python -m experiments.run --preset P --only_report`)."""
from __future__ import annotations

import csv
import json
import os
import platform
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

from common.errors import ConfigError
from common.rewards import REGISTRY
from experiments.grid import build_grid
from experiments import stats
from experiments.presets import PRESETS

META = ("run_id", "preset", "setting", "algo", "calculator", "baseline", "dropout", "rate", "answer_len", "seed",
        "seconds", "load_average")
METRICS = ("step", "gold_reward", "reward_score", "kl", "ref_logprob", "length")
FRONT_X = "ref_logprob"  # final eval log pi_ref(response | prompt): higher is likelier under the reference


def environment() -> dict:
    """Machine and library versions, recorded by the runner where the runs execute."""
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"machine": f"{os.cpu_count()} cores ({cpu}), GPU: {gpu}, {platform.platform()}",
            "software": {p: version(p) for p in ("torch", "transformers", "deepspeed", "numpy", "matplotlib")}
            | {"python": platform.python_version()}}


def collect(root: Path, include: tuple = (), stage3: tuple = ()) -> list[dict]:
    """One row per (finished run, eval step); a resumed run's repeated steps keep their last line.
    Runs of the grids in `include` join as their own lines: a run made with --stage3 settings other
    than this grid's (`stage3`) is labelled with them, and its run_id with its grid's folder."""
    rows, runs = [], []
    for grid in (root, *map(Path, include)):
        for summary in (grid / "runs").glob("*/summary.json"):
            meta = json.loads((summary.parent / "experiment.json").read_text())
            runs.append((meta, summary.parent, "" if grid == root else f"{grid.name}/"))
    order = list(REGISTRY)  # tables and legends list the calculators in the registry's order
    for meta, run, prefix in sorted(runs, key=lambda m: (order.index(m[0]["calculator"]), m[2], m[0]["run_id"])):
        evals = {}
        for line in (run / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            if m["split"] == "eval":
                evals[m["step"]] = m
        # a run with the per-token dense baseline is its own line: its "calculator" is e.g. abc+per_token
        name, ran_with = meta.get("variant", meta["calculator"]), meta.get("stage3", [])
        if list(ran_with) != list(stage3):  # named by the settings that differ from this grid's
            differ = [x for x in ran_with if x not in stage3] + [f"not {x}" for x in stage3 if x not in ran_with]
            name += f" [{' '.join(differ)}]"
        variant = {"calculator": name, "baseline": meta.get("baseline", "total"), "run_id": prefix + meta["run_id"]}
        rows += [{**{k: meta.get(k, "") for k in META}, **variant, **{k: evals[s][k] for k in METRICS}}
                 for s in sorted(evals)]
    return rows


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


SPEED_FRACTION, SPEED_WINDOW = 0.9, 3   # the speed target and its smoothing (eval points)
GOLD_REWARD_LABEL = "held-out gold reward (what the run optimises: --reward gold)"
METRIC_LABELS = {"reward_score": "held-out reward-model score (what the run optimises)",
                 "gold_reward": "held-out gold reward (logit)"}


def plot_curves(rows: list[dict], metric: str, title: str, path: Path, target: float | None, label: str) -> None:
    """`metric` vs step: mean over seeds and a band of two standard errors (and the speed target)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for calc, r in stats.by(rows, "calculator").items():
        c = stats.curve(r, metric)
        lo = [m - 2 * e for m, e in zip(c.mean, c.se)]
        hi = [m + 2 * e for m, e in zip(c.mean, c.se)]
        line, = ax.plot(c.steps, c.mean, marker=".", label=f"{calc} ({c.seeds} seeds)")
        ax.fill_between(c.steps, lo, hi, color=line.get_color(), alpha=0.15)
    if target is not None:
        ax.axhline(target, color="k", ls=":", lw=1, label=f"{SPEED_FRACTION:.0%} target")
    ax.set(xlabel="stage-3 step", ylabel=label, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dropout_points(rows: list[dict]) -> list[dict]:
    """Final (log-likelihood under the reference, gold reward) per dropout configuration, 'none' from
    the main grid's runs."""
    sweep = [r for r in rows if r["setting"] == "dropout"]
    if not sweep:
        return []
    algo, calc = sweep[0]["algo"], sweep[0]["calculator"]
    none = [r for r in rows if r["setting"] == "main" and (r["algo"], r["calculator"]) == (algo, calc)]
    points = []
    for key, r in stats.by(stats.common_seeds(none + sweep, "dropout_key"), "dropout_key").items():
        gold, gold_se = stats.mean_se(stats.finals(r, "gold_reward"))
        x, x_se = stats.mean_se(stats.finals(r, FRONT_X))
        kl, kl_se = stats.mean_se(stats.finals(r, "kl"))
        points.append({"label": key, "algo": algo, "calculator": calc, "seeds": len(stats.by(r, "run_id")),
                       "gold": gold, "gold_se": gold_se, "x": x, "x_se": x_se, "kl": kl, "kl_se": kl_se,
                       "length": stats.mean_se(stats.finals(r, "length"))[0]})
    return points


def plot_front(points: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for p in points:
        ax.errorbar(p["x"], p["gold"], xerr=2 * p["x_se"], yerr=2 * p["gold_se"], fmt="o", capsize=3, label=p["label"])
    best = stats.front(points, "x", "gold")
    ax.plot([p["x"] for p in best], [p["gold"] for p in best], "k--", lw=1, label="front")
    ax.set(xlabel="final log-likelihood of the responses under the reference, nats per response\n"
                  "(higher: closer to the reference)",
           ylabel="final held-out gold reward", title=f"reward dropout, {points[0]['algo']} + {points[0]['calculator']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(v, digits: int = 3) -> str:
    return "never" if v is None else f"{v:+.{digits}f}" if isinstance(v, float) else str(v)


def speed(rows: list[dict], metric: str) -> stats.Speed:
    return stats.speed_table(rows, metric, fraction=SPEED_FRACTION, window=SPEED_WINDOW)


def ratio_text(t: dict, sparse_step: int | None = None) -> str:
    def one(v):
        return "never" if v == float("inf") else f"{v:.2f}"
    ci = f" [{one(t['ci'][0])}, {one(t['ci'][1])}]" if t["ci"] else ""
    if t["ratio"] is None:  # it never got there; sparse was there from the start (no ratio); or sparse
        if t["step"] is None:  # never got there (then the interval still says how sure)
            return "never"
        return "sparse at the start" if sparse_step == 0 else f"sparse never{ci}"
    return f"{t['ratio']:.2f}{ci}"


def no_rise(sp: stats.Speed) -> bool:
    """Every calculator is at the target at step 0: no run rose above the start, so no speed to compare."""
    return all(t["step"] == 0 for t in sp.rows)


def speed_markdown(sp: stats.Speed, metric: str, gains: dict | None = None) -> str:
    gains = gains or {}
    lines = [f"Target: {SPEED_FRACTION:.0%} of the way from the start ({sp.start:+.3f}) to the best "
             f"{SPEED_WINDOW}-point smoothed mean any calculator reached ({sp.best:+.3f}): {sp.target:+.3f}.\n",
             f"| calculator | seeds | mean {metric}, all eval steps | final {metric} (± SE) "
             "| first step at the target | steps / sparse's [95% bootstrap] "
             "| mean over the run minus sparse's, same seed (± SE; seeds ahead) |", "|---|---|---|---|---|---|---|"]
    if no_rise(sp):
        lines.insert(1, "No calculator's smoothed mean rose above the start: there is no speed to compare.\n")
    sparse_step = next((t["step"] for t in sp.rows if t["calculator"] == "sparse"), None)
    for t in sp.rows:
        g = gains.get(t["calculator"])
        gain = f"{g[0]:+.3f} ± {g[1]:.3f} ({g[2]} of {g[3]})" if g else ""
        lines.append(f"| {t['calculator']} | {t['seeds']} | {fmt(t['mean_all_steps'])} | {fmt(t['final'])} "
                     f"± {t['final_se']:.3f} | {fmt(t['step'])} | {ratio_text(t, sparse_step)} | {gain} |")
    return "\n".join(lines)


def findings(sp: stats.Speed, gains: dict | None = None) -> str:
    """The headline in words, from the reward-score table: each calculator against the paper's claim
    (ABC at about half of sparse's steps), which final gaps are noise, and which paired gains are not."""
    table, gains = {t["calculator"]: t for t in sp.rows}, gains or {}
    sparse, out = table.get("sparse"), []
    if sparse is None:
        return ""
    for calc, t in table.items():
        if t is sparse:
            continue
        hi = t["ci"][1] if t["ci"] else None
        verdict = ("no interval: under two seeds" if hi is None else
                   "the interval excludes 1: faster than sparse" if hi < 1 else
                   "the interval includes 1: not shown faster than sparse")
        if t["step"] is None:
            out.append(f"{calc} never reached the target.")
        elif t["ratio"] is not None:
            out.append(f"{calc} reached it at {t['ratio']:.2f} x sparse's steps ({verdict}).")
        elif sparse["step"] is None:
            out.append(f"{calc} reached it at step {t['step']}, sparse never ({verdict}).")
    close = [t["calculator"] for t in sp.rows if t is not sparse and abs(t["final"] - sparse["final"])
             <= 2 * (t["final_se"] ** 2 + sparse["final_se"] ** 2) ** 0.5]
    if close:
        out.append(f"Final value within two standard errors of sparse's: {', '.join(close)}.")
    apart = [f"{calc} ({g[0]:+.3f} ± {g[1]:.3f}, {g[2]} of {g[3]} seeds ahead)" for calc, g in gains.items()
             if g[3] > 1 and abs(g[0]) > 2 * g[1]]
    if apart:
        out.append(f"Paired by seed, the mean over the run differs from sparse's by more than two standard "
                   f"errors for: {', '.join(apart)}.")
    oracle = table.get("oracle")
    if oracle is not None and not (oracle["ci"] and oracle["ci"][1] < 1):
        out.append("The oracle (exact gold credit) is not shown faster than sparse either: this setting "
                   "cannot show a credit-assignment effect; strengthen it before reading the others.")
    return " ".join(out)


def front_markdown(points: list[dict]) -> str:
    on = {p["label"] for p in stats.front(points, "x", "gold")}
    lines = ["| dropout | seeds | final gold reward (± SE) | final log π_ref(y) (± SE) | final KL(π‖π_ref) (± SE) "
             "| tokens | on the front |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['label']} | {p['seeds']} | {fmt(p['gold'])} ± {p['gold_se']:.3f} | {p['x']:.2f} ± "
              f"{p['x_se']:.2f} | {p['kl']:.2f} ± {p['kl_se']:.2f} | {p['length']:.1f} | "
              f"{'yes' if p['label'] in on else ''} |" for p in points]
    closest = min(points, key=lambda p: p["kl"])["label"]
    return "\n".join(lines + ["", "On the front (no other configuration has both a higher final gold reward and "
                               f"responses likelier under the reference, log π_ref(y) summed over the response): "
                               f"{', '.join(p['label'] for p in points if p['label'] in on)}. Lowest final KL: "
                               f"{closest}."])


def write_report(root: Path, out: Path, include: tuple = ()) -> Path:
    """CSV, PNGs and README.md of the finished runs under `root` (and the grids in `include`), into
    `out`; returns the README."""
    grid_file = root / "grid.json"
    if not grid_file.is_file():
        raise ConfigError(f"{grid_file}: not found; run the grid first (without --only_report)")
    grid = json.loads(grid_file.read_text())
    rows = collect(root, include, grid["config"].get("stage3", []))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=META + METRICS)
        writer.writeheader()
        writer.writerows(rows)
    rows = read_csv(out / "runs.csv")  # the tables and plots are computed from the CSV as written
    for r in rows:
        r["dropout_key"] = "none" if r["dropout"] == "none" else f"{r['dropout']} {float(r['rate']):g}"
    sections = []
    # under the gold reward (run.py --reward gold) the reward score is the gold reward: one table
    gold = grid["config"].get("reward") == "gold"
    metrics = (("reward_score", "score"),) + ((("gold_reward", "gold"),) if not gold else ())
    labels = {**METRIC_LABELS, **({"reward_score": GOLD_REWARD_LABEL} if gold else {})}
    for setting, what in (("main", "main grid"), ("long", "long answers")):
        for algo, r in stats.by([r for r in rows if r["setting"] == setting], "algo").items():
            r = stats.common_seeds(r, "calculator")
            title = f"{algo}, {what} (answers up to {r[0]['answer_len']} tokens)"
            parts = [f"### {algo}, {what}\n"]
            for metric, prefix in metrics:
                sp, gains, name = speed(r, metric), stats.paired_gains(r, metric), f"{prefix}_{setting}_{algo}.png"
                plot_curves(r, metric, title, out / name, sp.target, labels[metric])
                parts.append(f"#### {labels[metric]}\n\n{speed_markdown(sp, metric, gains)}\n")
                if metric == "reward_score" and (words := findings(sp, gains)):
                    parts.append(words + "\n")
                parts.append(f"![{algo} {what} {metric}]({name})\n")
            sections.append("\n".join(parts))
    points = dropout_points(rows)
    if points:
        plot_front(points, out / "dropout_front.png")
        sections.append(f"### Reward dropout\n\n{front_markdown(points)}\n\n![dropout front](dropout_front.png)\n")
    diagnostics = root / "diagnostics.json"
    if diagnostics.is_file():
        from experiments.diagnostics import markdown_by_setting
        saved = json.loads(diagnostics.read_text())  # one result per answer length; before that, one result
        sections.insert(0, f"### Before the grid: can this setting show credit assignment?\n\n"
                           f"{markdown_by_setting(saved.get('results') or {'main': saved['result']})}\n")
    readme = out / "README.md"
    readme.write_text(readme_text(grid, rows, sections, include))
    return readme


def readme_text(grid: dict, rows: list[dict], sections: list[str], include: tuple = ()) -> str:
    cfg = grid["config"]
    included = [f"- runs joined from `{other}`, made by `{json.loads((Path(other) / 'grid.json').read_text())['command']}`"
                for other in include]
    p = PRESETS[cfg["preset"]]
    done = {r["run_id"] for r in rows}
    specs = [s.record(cfg["preset"]) for s in build_grid(SimpleNamespace(**cfg), p)]
    counts = [f"{setting} {sum(s['run_id'] in done for s in group)} of {len(group)}"
              for setting, group in stats.by(specs, "setting").items()]
    runs = [r[0] for r in stats.by(rows, "run_id").values()]
    seconds = sorted(float(r["seconds"]) for r in runs if r["seconds"])
    load = sorted(float(r["load_average"]) for r in runs if r["load_average"])
    soft = ", ".join(f"{k} {v}" for k, v in grid["software"].items())
    return "\n".join([
        f"# Reward calculators on the embedded IMDb task: preset `{cfg['preset']}`\n",
        "Generated by `experiments/report.py`; every number comes from `runs.csv` (one row per run and eval step).\n",
        f"- command: `{grid['command']}`",
        f"- started {grid['started']}, finished {grid.get('finished', 'not yet (a partial grid)')}"
        + (f", {grid['wall_minutes']} min" if "wall_minutes" in grid else ""),
        f"- machine: {grid['machine']}",
        f"- software: {soft}",
        f"- stage-3 runs finished: {', '.join(counts)} (the dropout sweep's 'none' is the main grid's run)",
        *included,
        f"- stage-3 time of the {len(seconds)} timed runs: {sum(seconds) / 60:.0f} min in all, {seconds[len(seconds) // 2]:.0f} s "
        f"median ({seconds[0]:.0f}-{seconds[-1]:.0f} s); the machine's 1-minute load average after each run: "
        f"median {load[len(load) // 2]:.1f}, {load[0]:.1f}-{load[-1]:.1f}" if load else "- stage-3 time: not recorded",
        f"- budget: {cfg['steps'] or p.steps} stage-3 steps per run, held-out eval every "
        f"{cfg['eval_steps'] or p.eval_steps} steps; {p.note}",
        f"- stage-3 flags shared by every run: `{' '.join(map(str, p.stage3))}`"
        + (f", then `--stage3 {' '.join(cfg['stage3'])}`" if cfg.get("stage3") else ""),
        "- reward: " + ("the gold scorer itself (`--reward_model_type gold`), the positive control: the reward "
                        "score is the gold reward, and the oracle's credit is R's exact split"
                        if cfg.get("reward") == "gold" else "the stage-2 reward model") + "\n",
        "Primary: the reward-model score on held-out prompts, the reward each run optimises (what the "
        "ABC paper plots). Secondary: the gold reward, the embedded task's own sentiment scorer. Speed: "
        f"the first eval step at which a calculator's {SPEED_WINDOW}-point smoothed mean curve reaches "
        f"{SPEED_FRACTION:.0%} of the way from the start to the best smoothed mean of any calculator, over "
        "sparse's step, with a 95% bootstrap interval over seeds (the paper: ABC reached sparse's maximum "
        "at 46% of sparse's steps; its metric used sparse's own noisiest peak, which favours sparse, so it "
        "is not used here). The last column pairs each run with sparse's run of the same seed (the same "
        "start and the same prompts in the same order) and averages the differences of their means over "
        "the run. Bands: two standard errors over seeds. Means are over all eval steps, the "
        "initial one included. Each table and plot uses only the seeds that all of its configurations "
        "finished. `oracle` is the positive control: the gold scorer's exact per-word credit.\n",
        *sections])
