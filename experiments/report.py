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

META = ("run_id", "preset", "setting", "algo", "calculator", "dropout", "rate", "answer_len", "seed", "seconds",
        "load_average")
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


def collect(root: Path) -> list[dict]:
    """One row per (finished run, eval step); a resumed run's repeated steps keep their last line."""
    rows = []
    metas = [json.loads((s.parent / "experiment.json").read_text()) for s in (root / "runs").glob("*/summary.json")]
    order = list(REGISTRY)  # tables and legends list the calculators in the registry's order
    for meta in sorted(metas, key=lambda m: (order.index(m["calculator"]), m["run_id"])):
        run, evals = root / "runs" / meta["run_id"], {}
        for line in (run / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            if m["split"] == "eval":
                evals[m["step"]] = m
        rows += [{**{k: meta.get(k, "") for k in META}, **{k: evals[s][k] for k in METRICS}} for s in sorted(evals)]
    return rows


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def plot_curves(rows: list[dict], title: str, path: Path) -> None:
    """Held-out gold reward vs step: mean over seeds and a band of two standard errors."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for calc, r in stats.by(rows, "calculator").items():
        c = stats.curve(r, "gold_reward")
        lo = [m - 2 * e for m, e in zip(c.mean, c.se)]
        hi = [m + 2 * e for m, e in zip(c.mean, c.se)]
        line, = ax.plot(c.steps, c.mean, marker=".", label=f"{calc} ({c.seeds} seeds)")
        ax.fill_between(c.steps, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set(xlabel="stage-3 step", ylabel="held-out gold reward (logit)", title=title)
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


def headline_markdown(rows: list[dict]) -> str:
    table = stats.headline_table(rows)
    sparse = next((t for t in table if t["calculator"] == "sparse"), None)
    lines = []
    if sparse:
        c = stats.curve([r for r in rows if r["calculator"] == "sparse"], "gold_reward")
        lines.append(f"sparse's maximum mean gold reward: {max(c.mean):+.3f}, first at step {sparse['first_step']}\n")
    lines += ["| calculator | seeds | mean gold reward, all eval steps | final gold reward (± SE) "
              "| first step reaching sparse's max | fraction of sparse's step |", "|---|---|---|---|---|---|"]
    for t in table:
        frac = "never" if t["first_step"] is None else "n/a" if t["fraction"] is None else f"{t['fraction']:.2f}"
        lines.append(f"| {t['calculator']} | {t['seeds']} | {fmt(t['mean_all_steps'])} | {fmt(t['final'])} "
                     f"± {t['final_se']:.3f} | {fmt(t['first_step'])} | {frac} |")
    return "\n".join(lines + ([f"\n{findings(table, sparse)}"] if sparse else []))


def findings(table: list[dict], sparse: dict) -> str:
    """The headline in words, from the table: ABC against the paper, and which gaps are noise."""
    out = []
    abc = next((t for t in table if t["calculator"] == "abc"), None)
    if abc and abc["first_step"] is None:
        out.append("ABC never reached sparse's maximum (the paper: at 46% of sparse's steps).")
    elif abc and abc["fraction"] is not None:
        out.append(f"ABC reached sparse's maximum at {abc['fraction']:.0%} of sparse's steps (the paper: 46%).")
    close = [t["calculator"] for t in table if t is not sparse and abs(t["final"] - sparse["final"])
             <= 2 * (t["final_se"] ** 2 + sparse["final_se"] ** 2) ** 0.5]
    if close:
        out.append(f"Final gold reward within two standard errors of sparse's: {', '.join(close)}.")
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


def write_report(root: Path, out: Path) -> Path:
    """CSV, PNGs and README.md of the finished runs under `root`, into `out`; returns the README."""
    grid_file = root / "grid.json"
    if not grid_file.is_file():
        raise ConfigError(f"{grid_file}: not found; run the grid first (without --only_report)")
    grid = json.loads(grid_file.read_text())
    rows = collect(root)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=META + METRICS)
        writer.writeheader()
        writer.writerows(rows)
    rows = read_csv(out / "runs.csv")  # the tables and plots are computed from the CSV as written
    for r in rows:
        r["dropout_key"] = "none" if r["dropout"] == "none" else f"{r['dropout']} {float(r['rate']):g}"
    sections = []
    for setting, what in (("main", "main grid"), ("long", "long answers")):
        for algo, r in stats.by([r for r in rows if r["setting"] == setting], "algo").items():
            r = stats.common_seeds(r, "calculator")
            name = f"gold_{setting}_{algo}.png"
            plot_curves(r, f"{algo}, {what} (answers up to {r[0]['answer_len']} tokens)", out / name)
            sections.append(f"### {algo}, {what}\n\n{headline_markdown(r)}\n\n![{algo} {what}]({name})\n")
    points = dropout_points(rows)
    if points:
        plot_front(points, out / "dropout_front.png")
        sections.append(f"### Reward dropout\n\n{front_markdown(points)}\n\n![dropout front](dropout_front.png)\n")
    readme = out / "README.md"
    readme.write_text(readme_text(grid, rows, sections))
    return readme


def readme_text(grid: dict, rows: list[dict], sections: list[str]) -> str:
    cfg = grid["config"]
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
        f"- stage-3 time of the {len(seconds)} timed runs: {sum(seconds) / 60:.0f} min in all, {seconds[len(seconds) // 2]:.0f} s "
        f"median ({seconds[0]:.0f}-{seconds[-1]:.0f} s); the machine's 1-minute load average after each run: "
        f"median {load[len(load) // 2]:.1f}, {load[0]:.1f}-{load[-1]:.1f}" if load else "- stage-3 time: not recorded",
        f"- budget: {cfg['steps'] or p.steps} stage-3 steps per run, held-out eval every "
        f"{cfg['eval_steps'] or p.eval_steps} steps; {p.note}",
        f"- stage-3 flags shared by every run: `{' '.join(map(str, p.stage3))}`\n",
        "Gold reward: the embedded task's own sentiment scorer (not the learned reward model) on "
        "held-out prompts; the bands are two standard errors over seeds. 'First step reaching "
        "sparse's max' is the ABC paper's headline metric (ABC: 46% of sparse's steps there); the "
        "means are over all eval steps, the initial one included. Each table and plot uses only the seeds "
        "that all of its configurations finished.\n",
        *sections])
