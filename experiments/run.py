"""Compare the reward calculators on the embedded IMDb task: one command, one report.

    python -m experiments.run --preset tiny            # 2 CPU cores
    python -m experiments.run --preset smollm2         # one GPU, the ABC paper's setting

Builds one stage-1 model, one reward model and one token discriminator under --out (reused
once complete; or takes yours: --sft_model, --reward_model, --discriminator), then runs stage 3 for every configuration of the grid from them with the
same budget, one plain process at a time, and writes the report (experiments/report.py).
A finished run (its summary.json exists) is skipped, an unfinished one resumes, so a killed
grid continues where it stopped.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script

from common import REPO_ROOT
from common.cli import run_main
from common.config import RewardCalcArgs, RLHFConfig, arg, did_you_mean, parse_config
from common.errors import ConfigError, DensehfError
from common.models import resolve_model_path
from common.rewards import REGISTRY, needs_of
from experiments.grid import BASELINES, REWARDS, SETTINGS, RunSpec, build_grid
from experiments.presets import PRESETS, REWARD_RECIPES
from experiments.report import environment, write_report

ALGOS = ("remax", "ppo")


@dataclass
class ExperimentConfig:
    preset: str = arg("tiny", "Budget and models: tiny (2 CPU cores) or smollm2 (one GPU, the "
                      "paper-like setting); see experiments/presets.py.", choices=tuple(PRESETS))
    seeds: int = arg(0, "Seeds per configuration (0: the preset's; tiny 3, smollm2 5).")
    first_seed: int = arg(1, "The first seed: a grid split over machines or processes runs disjoint seed ranges "
                          "(e.g. --seeds 2, then --first_seed 3 --seeds 1), each into its own --out.")
    steps: int = arg(0, "Stage-3 steps per run (0: the preset's; tiny 80, smollm2 150).")
    eval_steps: int = arg(0, "Held-out evaluation every N stage-3 steps (0: the preset's).")
    pretrain_steps: int = arg(0, "Steps of each stage-1/2 model (0: the preset's); for quick checks.")
    sft_model: str = arg("", "A stage-1 output to start every run from (empty: build one under --out).")
    reward_model: str = arg("", "A stage-2 sequence reward model (empty: build one under --out).")
    reward_recipe: str = arg("preset", "How a reward model is built when --reward_model is empty: preset (the "
                             "preset's, from the stage-1 model) or smollm2_lora (SmolLM2 with LoRA on its last "
                             "layer's MLP, whose attention stays pretrained; experiments/presets.py).",
                             choices=("preset", *REWARD_RECIPES))
    discriminator: str = arg("", "A stage-2 token discriminator, for tlcr (empty: build one under --out).")
    calculators: list[str] = arg(list(REGISTRY), "Reward calculators of the main grid.", choices=tuple(REGISTRY))
    reward: str = arg("model", "What the runs optimise: model (the stage-2 reward model) or gold (the task's gold "
                      "scorer, --reward_model_type gold): the positive control, where the oracle's credit is R's "
                      "exact split, so oracle vs sparse shows what exact credit can gain here. With gold the "
                      "calculators that read the reward model's attention (abc, composite) are not run.",
                      choices=REWARDS)
    algos: list[str] = arg(list(ALGOS), "RL algorithms of the main grid.", choices=ALGOS)
    settings: list[str] = arg(list(SETTINGS), "What to run: main (calculators x algos x seeds), dropout "
                              "(reward-dropout sweep), long (long answers).", choices=SETTINGS)
    dense_baselines: list[str] = arg(["total"], "Baselines of the main grid for remax (--dense_baseline): total "
                                     "(the published) and/or per_token; a per_token run is reported as CALC+per_token "
                                     "(not run for sparse, where the two are the same).", choices=BASELINES)
    dropout_algo: str = arg("remax", "Algorithm of the reward-dropout sweep.", choices=ALGOS)
    dropout_calculator: str = arg("sparse", "Calculator of the reward-dropout sweep.", choices=tuple(REGISTRY))
    dropout_rates: list[float] = arg([0.8, 0.9, 0.95], "Dropout rates swept for random and quantile.")
    long_algo: str = arg("remax", "Algorithm of the long-answer setting.", choices=ALGOS)
    long_calculators: list[str] = arg(["sparse", "abc"], "Calculators of the long-answer setting.",
                                      choices=tuple(REGISTRY))
    out: str = arg("", "Where models, runs and logs go (empty: output/experiments/PRESET).")
    report_dir: str = arg("", "Where the CSV, PNGs and README.md go (empty: experiments/results/PRESET).")
    include: list[str] = arg([], "Other grids' --out folders whose finished runs join the report, each a line of "
                             "its own, labelled with its --stage3 settings where they differ from this grid's "
                             "(e.g. the abc runs of a grid run with --stage3 abc_attention_layer=0).")
    only_report: bool = arg(False, "Only rewrite the report from the runs finished so far.")
    diagnostic_samples: int = arg(64, "Held-out prompts of the pre-grid diagnostics (is the reward model's "
                                  "attention informative? is the greedy baseline degenerate?); 0 skips them. "
                                  "Not run with --reward gold, where no reward model is read.")
    parallel_runs: int = arg(1, "Stage-3 runs at once, each a one-thread process (OMP_NUM_THREADS=1 unless set): "
                             "2 on a 2-core machine doubles the grid's pace; timings per run then share the cores.")
    stage3: list[str] = arg([], "Stage-3 settings for every run, over the preset's: NAME=VALUE, or NAME / no-NAME "
                            "for a switch (e.g. actor_learning_rate=2e-4 ppo_epochs=8 no-adaptive_kl). A finished "
                            "run made with other settings is an error, not a result.")


def run_process(args: list, log_path: Path, what: str) -> None:
    """One entry point as a plain single process (world size 1), its output in `log_path`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        rc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise DensehfError(f"{what}: {args[0]} exited {rc}; log {log_path}; it ended with:\n{tail}")


def stage3_overrides(cfg: ExperimentConfig) -> list[str]:
    """--stage3 NAME=VALUE ... as stage-3 flags; an unknown NAME fails before anything runs."""
    names, flags = {f.name for f in fields(RLHFConfig)}, []
    for item in cfg.stage3:
        name, has_value, value = item.partition("=")
        field_name = name[3:] if name.startswith("no-") and not has_value else name
        if field_name not in names:
            raise ConfigError(f"--stage3 {item!r}: stage 3 has no setting {field_name!r}"
                              f"{did_you_mean(field_name, names)}")
        flags += [f"--{name}", value] if has_value else [f"--{name}"]
    return flags


def models_needed(cfg: ExperimentConfig, specs: list[RunSpec]) -> set[str]:
    """The stage-1/2 models the grid reads: the policy's start always, the reward model unless the runs
    optimise the gold reward, the discriminator where a calculator reads TLCR's token rewards."""
    calc_args = RewardCalcArgs()  # a composite's parts as its runs get them (stage 3's default weights)
    needs = set().union(*(needs_of(replace(calc_args, reward_calculator=s.calculator)) for s in specs))
    return {"sft"} | ({"rm"} if cfg.reward == "model" else set()) | ({"disc"} if "token_rewards" in needs else set())


def model_paths(cfg: ExperimentConfig, root: Path, needed: set[str]) -> dict[str, Path]:
    """The stage-1/2 models every run shares: the ones given, else those built under `root`."""
    given = {"sft": cfg.sft_model, "rm": cfg.reward_model, "disc": cfg.discriminator}
    return {name: Path(path) if path else root / built_folder(cfg, name) for name, path in given.items()
            if name in needed}


def built_folder(cfg: ExperimentConfig, name: str) -> str:
    """Where under --out a model the grid builds goes: a reward model of another recipe in its own folder."""
    return f"rm_{cfg.reward_recipe}" if name == "rm" and cfg.reward_recipe != "preset" else name


def build_models(cfg: ExperimentConfig, root: Path, needed: set[str]) -> dict[str, Path]:
    """Stage 1 and, where the grid reads them, stage 2 (reward model, discriminator); each skipped once
    complete or given."""
    p, paths = PRESETS[cfg.preset], model_paths(cfg, root, needed)
    stages = {
        "sft": ["step1_sft/main.py", "--model_name_or_path", p.model, *p.sft],
        "rm": ["step2_reward/main.py", "--model_type", "sequence",
               *(REWARD_RECIPES[cfg.reward_recipe] if cfg.reward_recipe != "preset" else
                 ("--model_name_or_path", paths["sft"], *p.reward, *p.reward_model))],
        "disc": ["step2_reward/main.py", "--model_type", "token", "--model_name_or_path", paths["sft"],
                 *p.reward, *p.discriminator],
    }
    for name, args in stages.items():
        if name not in paths:
            continue
        out = paths[name]
        if out != root / built_folder(cfg, name):
            print(f"{name}: using {out}", flush=True)
            continue
        if (out / "summary.json").is_file():
            print(f"{name}: reusing {out}", flush=True)
            continue
        started = time.time()
        args += ["--data_path", "imdb", "--output_dir", out, "--resume"]
        run_process(args + (["--max_steps", cfg.pretrain_steps] if cfg.pretrain_steps else []),
                    out / "run.log", name)
        print(f"{name}: built {out} in {time.time() - started:.0f} s", flush=True)
    return paths


def diagnostic_lengths(cfg: ExperimentConfig) -> dict[str, tuple[int, int]]:
    """(answer length, minimum) of each setting the grid runs: the diagnostics are taken at each."""
    p = PRESETS[cfg.preset]
    lengths = {"main": (p.answer_len, p.min_answer_len), "long": (p.long_answer_len, p.long_min_answer_len)}
    wanted = {"long" if s == "long" else "main" for s in cfg.settings}
    return {name: length for name, length in lengths.items() if name in wanted}


def run_diagnostics(cfg: ExperimentConfig, root: Path, models: dict[str, Path]) -> None:
    """experiments/diagnostics.py on the grid's models, at each setting's answer length, once
    (diagnostics.json), printed."""
    from common.gold import GoldScorer
    from common.presets import gold_scorer_path
    from common.tasks.imdb import build_imdb_task
    from experiments.diagnostics import diagnose, markdown_by_setting
    path, lengths = root / "diagnostics.json", diagnostic_lengths(cfg)
    key = {"sft": str(models["sft"]), "rm": str(models["rm"]), "samples": cfg.diagnostic_samples,
           "lengths": {name: list(length) for name, length in lengths.items()}}
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        results = json.loads(path.read_text())["results"]
    else:
        task = build_imdb_task()
        lines = (task / "prompts" / "eval.jsonl").read_text(encoding="utf-8").splitlines()[:cfg.diagnostic_samples]
        prompts, gold = [json.loads(line)["prompt"] for line in lines], GoldScorer.load(gold_scorer_path(task))
        results = {name: diagnose(resolve_model_path(str(models["sft"])), resolve_model_path(str(models["rm"])),
                                  prompts, gold, answer_len=length, min_answer_len=least).as_dict()
                   for name, (length, least) in lengths.items()}
        path.write_text(json.dumps({"key": key, "results": results}, indent=1))
    print(markdown_by_setting(results), flush=True)


def stage3_args(cfg: ExperimentConfig, spec: RunSpec, models: dict[str, Path], out: Path) -> list:
    p = PRESETS[cfg.preset]
    steps = cfg.steps or p.steps
    return ["step3_rlhf/main.py", *spec.flags(), "--actor_model_name_or_path", models["sft"],
            *(["--reward_model_name_or_path", models["rm"]] if "rm" in models else []),
            *(["--discriminator_model_name_or_path", models["disc"]] if "disc" in models else []),
            "--data_path", "imdb", "--output_dir", out, "--max_steps", steps,
            "--eval_steps", cfg.eval_steps or p.eval_steps, "--save_steps", max(1, steps // 2),
            "--num_eval_samples", 0, "--resume", *p.stage3,
            *(["--reward_model_type", "gold"] if cfg.reward == "gold" else []), *stage3_overrides(cfg)]


def finished(cfg: ExperimentConfig, out: Path) -> bool:
    """Whether the run in `out` is done; one done with another budget is an error, not a result."""
    if not (out / "summary.json").is_file():
        return False
    p, ran = PRESETS[cfg.preset], yaml.safe_load((out / "config.yaml").read_text())
    for key, want in (("max_steps", cfg.steps or p.steps), ("eval_steps", cfg.eval_steps or p.eval_steps)):
        if ran[key] != want:
            raise ConfigError(f"{out / 'config.yaml'}: {key} {ran[key]}, but this grid asks for {want}: "
                              f"use another --out, or delete that run")
    ran_with = json.loads((out / "experiment.json").read_text()).get("stage3", [])
    if ran_with != cfg.stage3:
        raise ConfigError(f"{out / 'experiment.json'}: run with --stage3 {' '.join(ran_with) or '(none)'}, but this "
                          f"grid asks for {' '.join(cfg.stage3) or '(none)'}: use another --out, or delete that run")
    return True


def run_one(cfg: ExperimentConfig, root: Path, models: dict[str, Path], spec: RunSpec) -> float:
    """One stage-3 run of the grid; its seconds, and the machine's load after it, go to experiment.json."""
    out = root / "runs" / spec.run_id
    out.mkdir(parents=True, exist_ok=True)
    record = {**spec.record(cfg.preset), "stage3": cfg.stage3}
    (out / "experiment.json").write_text(json.dumps(record))
    started = time.time()
    run_process(stage3_args(cfg, spec, models, out), out / "run.log", spec.run_id)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: only resuming needs them
    seconds = time.time() - started
    # when, how long, and the machine's load: timings on a shared machine (or beside --parallel_runs)
    record.update(started=round(started, 1), seconds=round(seconds, 1), load_average=os.getloadavg()[0])
    (out / "experiment.json").write_text(json.dumps(record))
    return seconds


def run_grid(cfg: ExperimentConfig, root: Path, models: dict[str, Path], specs: list[RunSpec]) -> None:
    """The unfinished runs, `--parallel_runs` at a time (threads only wait on their processes)."""
    todo = [s for s in specs if not finished(cfg, root / "runs" / s.run_id)]
    print(f"{len(specs)} stage-3 runs, {len(specs) - len(todo)} already finished", flush=True)
    spent = []
    with ThreadPoolExecutor(max_workers=cfg.parallel_runs) as pool:
        jobs = {pool.submit(run_one, cfg, root, models, spec): spec for spec in todo}
        try:
            for job in as_completed(jobs):
                spec, seconds = jobs[job], job.result()
                spent.append(seconds)
                s = json.loads((root / "runs" / spec.run_id / "summary.json").read_text())
                left = sum(spent) / len(spent) * (len(todo) - len(spent)) / cfg.parallel_runs / 60
                print(f"[{len(spent)}/{len(todo)}] {spec.run_id}: {seconds:.0f} s, gold reward "
                      f"{s['initial_eval']['gold_reward']:+.3f} -> {s['final_eval']['gold_reward']:+.3f}, "
                      f"~{left:.0f} min left", flush=True)
        except BaseException:
            for other in jobs:  # a failed run stops the grid once the running ones end (each resumable)
                other.cancel()
            raise


def main(argv=None) -> None:
    cfg = parse_config(ExperimentConfig, argv, description=__doc__)
    root = Path(cfg.out or REPO_ROOT / "output" / "experiments" / cfg.preset)
    report_dir = Path(cfg.report_dir or REPO_ROOT / "experiments" / "results" / cfg.preset)
    for other in cfg.include:
        if not (Path(other) / "grid.json").is_file():
            raise ConfigError(f"--include {other}: no grid.json there; give the --out folder of a grid")
    if not cfg.only_report:
        stage3_overrides(cfg)  # a misspelt setting fails before grid.json is rewritten
        if cfg.parallel_runs < 1:
            raise ConfigError(f"--parallel_runs {cfg.parallel_runs}: at least 1")
        for given in (cfg.sft_model, cfg.reward_model, cfg.discriminator):
            if given:
                resolve_model_path(given)  # a missing folder fails before grid.json is rewritten
        root.mkdir(parents=True, exist_ok=True)
        args = sys.argv[1:] if argv is None else argv
        meta = {"command": shlex.join(["python", "-m", "experiments.run", *map(str, args)]),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": asdict(cfg),
                **environment()}
        (root / "grid.json").write_text(json.dumps(meta, indent=1))
        started, specs = time.time(), build_grid(cfg, PRESETS[cfg.preset])
        models = build_models(cfg, root, models_needed(cfg, specs))
        if cfg.diagnostic_samples and "rm" in models:
            run_diagnostics(cfg, root, models)
        run_grid(cfg, root, models, specs)
        meta.update(finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    wall_minutes=round((time.time() - started) / 60, 1))
        (root / "grid.json").write_text(json.dumps(meta, indent=1))
    print(f"report: {write_report(root, report_dir, tuple(cfg.include))}", flush=True)


if __name__ == "__main__":
    run_main(main)
