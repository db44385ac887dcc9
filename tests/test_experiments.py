"""The experiment runner and report: the grid, the models it builds, the report's sections (fast), and
a two-run grid end to end whose table is recomputed here from the CSV it wrote (slow). The statistics
are in tests/test_experiment_stats.py."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from common.config import RLHFConfig, parse_config
from common.errors import ConfigError, DensehfError
from experiments.grid import RunSpec, build_grid
from experiments.presets import PRESETS


def test_dropout_front_plots_log_likelihood_under_the_reference_against_gold_reward():
    from experiments.report import dropout_points, front_markdown
    def row(setting, dropout, rate, seed, step, gold, ref_logprob):
        return {"run_id": f"{dropout}{rate}-s{seed}", "setting": setting, "algo": "remax", "calculator": "sparse",
                "dropout": dropout, "rate": rate, "seed": str(seed), "step": str(step), "gold_reward": str(gold),
                "ref_logprob": str(ref_logprob), "kl": "9.9", "length": "12",
                "dropout_key": "none" if dropout == "none" else f"{dropout} {float(rate):g}"}
    rows = [row("main", "none", "0.0", s, 0, 0.0, -20.0) for s in (1, 2)]
    rows += [row("main", "none", "0.0", s, 4, g, lp) for s, g, lp in ((1, 0.4, -30.0), (2, 0.6, -34.0))]
    rows += [row("dropout", "quantile", "0.9", s, 4, g, lp) for s, g, lp in ((1, 0.5, -25.0), (2, 0.5, -27.0))]
    rows += [row("dropout", "random", "0.9", s, 4, g, lp) for s, g, lp in ((1, 0.1, -40.0), (2, 0.3, -40.0))]
    points = {p["label"]: p for p in dropout_points(rows)}
    assert points["none"]["x"] == pytest.approx(-32.0) and points["none"]["gold"] == pytest.approx(0.5)
    assert points["none"]["x_se"] == pytest.approx(2.0)  # final steps only
    assert points["quantile 0.9"]["x"] == pytest.approx(-26.0) and points["none"]["kl"] == pytest.approx(9.9)
    on_front = [line.split("|")[1].strip() for line in front_markdown(list(points.values())).splitlines()
                if line.endswith("| yes |")]
    assert on_front == ["quantile 0.9"]  # likelier under the reference at the same gold reward as none


def test_grid_orders_seeds_first_and_shares_the_dropout_baseline():
    class Cfg:  # the fields build_grid reads
        seeds, calculators, algos, settings = 2, ["sparse", "abc"], ["remax"], ["main", "dropout", "long"]
        dropout_algo, dropout_calculator, dropout_rates = "remax", "sparse", [0.9]
        long_algo, long_calculators = "remax", ["abc"]
    specs = build_grid(Cfg, PRESETS["tiny"])
    ids = [s.run_id for s in specs]
    assert len(ids) == len(set(ids)) == 2 * 2 + 2 * 2 + 2  # main, dropout (none shared with main), long
    assert ids[:4] == ["remax-sparse-s1", "remax-abc-s1", "remax-sparse-s2", "remax-abc-s2"]
    assert "remax-sparse-quantile0.9-s2" in ids and "remax-abc-len48-s1" in ids
    assert RunSpec("dropout", "ppo", "abc", "random", 0.95, 15, 3).flags()[-8:] == [
        "--reward_dropout", "random", "--reward_dropout_rate", 0.95, "--max_answer_seq_len", 15, "--seed", 3]
    Cfg.first_seed, Cfg.seeds, Cfg.settings = 3, 1, ["main"]   # a grid split by seed ranges
    assert [s.run_id for s in build_grid(Cfg, PRESETS["tiny"])] == ["remax-sparse-s3", "remax-abc-s3"]
    Cfg.first_seed, Cfg.seeds, Cfg.settings = 1, 2, ["main", "dropout", "long"]
    paper = {s.run_id: s.flags() for s in build_grid(Cfg, PRESETS["smollm2"])}  # 8-15 and 140-160 new tokens
    assert paper["remax-abc-s1"][-6:] == ["--max_answer_seq_len", 15, "--seed", 1, "--min_answer_seq_len", 8]
    assert paper["remax-abc-len160-s1"][-6:] == ["--max_answer_seq_len", 160, "--seed", 1, "--min_answer_seq_len", 140]


def test_per_token_baselines_are_their_own_runs_and_report_lines(tmp_path):
    from experiments.report import collect

    class Cfg:
        seeds, first_seed, calculators, algos, settings = 1, 1, ["sparse", "abc"], ["remax", "ppo"], ["main"]
        dense_baselines = ["total", "per_token"]
    specs = build_grid(Cfg, PRESETS["tiny"])
    # not for sparse (every return-to-go is R: the same run) nor for ppo (its critic is the baseline)
    assert [s.run_id for s in specs] == ["remax-sparse-s1", "remax-abc-s1", "remax-abc-per_token-s1",
                                         "ppo-sparse-s1", "ppo-abc-s1"]
    assert specs[2].flags()[-2:] == ["--dense_baseline", "per_token"] and "--dense_baseline" not in specs[1].flags()
    for spec in specs[1:3]:
        run = tmp_path / "runs" / spec.run_id
        run.mkdir(parents=True)
        (run / "experiment.json").write_text(json.dumps(spec.record("tiny")))
        (run / "summary.json").write_text("{}")
        (run / "metrics.jsonl").write_text(json.dumps({"split": "eval", "step": 0, "gold_reward": 0.1, "reward_score": 0.2,
                                                       "kl": 0.0, "ref_logprob": -9.0, "length": 15}) + "\n")
    rows = collect(tmp_path)
    assert [(r["run_id"], r["calculator"], r["baseline"]) for r in rows] == [
        ("remax-abc-per_token-s1", "abc+per_token", "per_token"), ("remax-abc-s1", "abc", "total")]


def test_a_gold_reward_grid_runs_what_needs_no_reward_model_and_passes_the_type():
    from experiments.run import ExperimentConfig, stage3_args

    class Cfg:
        seeds, first_seed, calculators, algos, settings = 1, 1, ["sparse", "abc", "composite", "oracle"], ["ppo"], \
            ["main", "long"]
        long_algo, long_calculators, reward = "remax", ["sparse", "abc"], "gold"
    specs = build_grid(Cfg, PRESETS["tiny"])
    # abc reads the reward model's attention, and composite's default parts do: nothing to read
    assert [s.run_id for s in specs] == ["ppo-sparse-s1", "ppo-oracle-s1", "remax-sparse-len48-s1"]
    models = {"sft": "s", "rm": "r", "disc": "d"}
    args = stage3_args(ExperimentConfig(reward="gold"), specs[0], models, "out")
    assert args[-2:] == ["--reward_model_type", "gold"]
    assert "--reward_model_type" not in stage3_args(ExperimentConfig(), specs[0], models, "out")


def test_a_grid_builds_only_the_models_it_reads_and_sets_stage3_over_the_preset(tmp_path):
    from experiments.run import ExperimentConfig, finished, models_needed, stage3_args, stage3_overrides
    def specs(*calculators):
        return [RunSpec("main", "ppo", c, "none", 0.0, 15, 1) for c in calculators]
    assert models_needed(ExperimentConfig(), specs("sparse", "abc")) == {"sft", "rm"}
    assert models_needed(ExperimentConfig(), specs("composite")) == {"sft", "rm", "disc"}  # abc:0.5,tlcr:0.5
    assert models_needed(ExperimentConfig(reward="gold"), specs("sparse", "oracle")) == {"sft"}
    assert models_needed(ExperimentConfig(reward="gold"), specs("tlcr")) == {"sft", "disc"}
    cfg = ExperimentConfig(reward="gold", stage3=["actor_learning_rate=2e-4", "no-adaptive_kl"])
    args = stage3_args(cfg, specs("sparse")[0], {"sft": "s"}, "out")
    assert "--reward_model_name_or_path" not in args and "--discriminator_model_name_or_path" not in args
    assert args[-3:] == ["--actor_learning_rate", "2e-4", "--no-adaptive_kl"]
    ran = parse_config(RLHFConfig, [str(a) for a in args[1:]])  # after the preset's flags, so they win
    assert ran.actor_learning_rate == 2e-4 and not ran.adaptive_kl and ran.ppo_epochs == 4
    with pytest.raises(ConfigError, match="no setting 'actor_learning_rat' \\(did you mean 'actor_learning_rate'"):
        stage3_overrides(ExperimentConfig(stage3=["actor_learning_rat=1"]))
    # a finished run made with other stage-3 settings is not mixed into the grid
    (tmp_path / "summary.json").write_text("{}")
    tiny = PRESETS["tiny"]
    (tmp_path / "config.yaml").write_text(f"max_steps: {tiny.steps}\neval_steps: {tiny.eval_steps}\n")
    (tmp_path / "experiment.json").write_text(json.dumps({"stage3": cfg.stage3}))
    assert finished(cfg, tmp_path)
    with pytest.raises(ConfigError, match="run with --stage3 actor_learning_rate=2e-4 no-adaptive_kl, but this grid "
                                          "asks for \\(none\\)"):
        finished(ExperimentConfig(), tmp_path)


def test_a_reward_recipe_builds_its_own_reward_model_in_its_own_folder(tmp_path, monkeypatch):
    from experiments import run
    built = []
    monkeypatch.setattr(run, "run_process", lambda args, log, what: built.append([str(a) for a in args]))
    cfg = run.ExperimentConfig(reward_recipe="smollm2_lora")
    paths = run.build_models(cfg, tmp_path, {"sft", "rm"})
    assert paths == {"sft": tmp_path / "sft", "rm": tmp_path / "rm_smollm2_lora"}  # not the preset's rm/
    rm = next(a for a in built if a[0] == "step2_reward/main.py")
    assert rm[rm.index("--model_name_or_path") + 1] == "smollm2" and str(tmp_path / "sft") not in rm
    assert rm[rm.index("--lora_module_name") + 1] == "layers.29.mlp.gate_proj,layers.29.mlp.up_proj,layers.29.mlp.down_proj"
    assert rm[rm.index("--output_dir") + 1] == str(tmp_path / "rm_smollm2_lora")
    built.clear()
    paths = run.build_models(run.ExperimentConfig(), tmp_path, {"sft", "rm"})  # the preset's recipe
    rm = next(a for a in built if a[0] == "step2_reward/main.py")
    assert paths["rm"] == tmp_path / "rm" and rm[rm.index("--model_name_or_path") + 1] == str(tmp_path / "sft")


def test_diagnostics_are_taken_at_each_settings_answer_length():
    from experiments.diagnostics import markdown_by_setting
    from experiments.run import ExperimentConfig, diagnostic_lengths
    tiny = PRESETS["tiny"]
    assert diagnostic_lengths(ExperimentConfig(settings=["main", "dropout"])) == {"main": (tiny.answer_len, 0)}
    assert diagnostic_lengths(ExperimentConfig(settings=["dropout", "long"])) == {
        "main": (tiny.answer_len, 0), "long": (tiny.long_answer_len, 0)}
    assert list(diagnostic_lengths(ExperimentConfig(settings=["long"]))) == ["long"]
    result = dict(samples=4, attention_entropy=0.9, attention_vs_occlusion=0.1, by_layer=[0.1], oracle_vs_occlusion=0.3,
                  sampled_score=0.0, greedy_score=0.1, greedy_repetitive=0.0, verdict="v")
    text = markdown_by_setting({"main": {**result, "answer_len": 15}, "long": {**result, "answer_len": 48}})
    assert text.index("#### main setting") < text.index("up to 15 tokens") < text.index("#### long setting") < \
        text.index("up to 48 tokens")
    assert "####" not in markdown_by_setting({"long": {**result, "answer_len": 48}})


def test_a_gold_reward_report_names_the_gold_reward_as_what_the_runs_optimise(tmp_path):
    from dataclasses import asdict
    from experiments.report import GOLD_REWARD_LABEL, METRIC_LABELS, environment, write_report
    from experiments.run import ExperimentConfig
    cfg = ExperimentConfig(reward="gold", calculators=["sparse", "oracle"], algos=["ppo"], settings=["main"], seeds=1)
    (tmp_path / "grid.json").write_text(json.dumps({"command": "python -m experiments.run --reward gold",
                                                    "started": "now", "config": asdict(cfg), **environment()}))
    for spec, score in zip(build_grid(cfg, PRESETS["tiny"]), (0.5, 0.9)):
        finished_run(tmp_path, spec, score)
    readme = write_report(tmp_path, tmp_path / "report").read_text()
    assert f"#### {GOLD_REWARD_LABEL}" in readme and METRIC_LABELS["reward_score"] not in readme
    assert METRIC_LABELS["gold_reward"] not in readme  # the one metric, once
    assert "- reward: the gold scorer itself" in readme and table_rows(readme)["oracle"][3] == "4"


def test_a_report_joins_another_grids_runs_labelled_with_their_stage3_settings(tmp_path):
    """abc reading layer 0 (a grid run with --stage3 abc_attention_layer=0) beside the main grid's
    abc and sparse, in one table: its own line, named by the setting that differs (both grids at the
    same learning rate, which the label leaves out)."""
    from dataclasses import asdict
    from experiments.report import environment, read_csv, write_report
    from experiments.run import ExperimentConfig
    main, layer0 = tmp_path / "main", tmp_path / "layer0"
    lr = "actor_learning_rate=4e-4"
    grids = ((main, ["sparse", "abc"], [lr]), (layer0, ["abc"], [lr, "abc_attention_layer=0"]))
    for root, calculators, stage3 in grids:
        cfg = ExperimentConfig(calculators=calculators, algos=["ppo"], settings=["main"], seeds=1, stage3=stage3)
        (root / "runs").mkdir(parents=True)
        (root / "grid.json").write_text(json.dumps({"command": f"grid {root.name}", "started": "now",
                                                    "config": asdict(cfg), **environment()}))
        for spec in build_grid(cfg, PRESETS["tiny"]):
            finished_run(root, spec, {"sparse": 0.5, "abc": 0.6}[spec.calculator] + 0.3 * (root == layer0), stage3)
    readme = write_report(main, tmp_path / "report", (layer0,)).read_text()
    table = table_rows(section(readme, "held-out reward-model score"))
    assert [(name, cells[2], cells[3]) for name, cells in table.items()] == [  # final, first step at the target
        ("sparse", "+0.500 ± 0.000", "never"), ("abc", "+0.600 ± 0.000", "never"),
        ("abc [abc_attention_layer=0]", "+0.900 ± 0.000", "4")]
    assert "- runs joined from `" + str(layer0) + "`, made by `grid layer0`" in readme
    # one seed each: a bootstrap over one seed gives that seed back, so no interval is claimed
    assert ("abc never reached the target. abc [abc_attention_layer=0] reached it at step 4, sparse never (no "
            "interval: under two seeds).") in readme
    csv_ids = {r["run_id"] for r in read_csv(tmp_path / "report" / "runs.csv")}
    assert csv_ids == {"ppo-sparse-s1", "ppo-abc-s1", "layer0/ppo-abc-s1"}


def finished_run(root, spec, final: float, stage3=()) -> None:
    """A finished stage-3 run of `spec` under `root` whose two eval points go from 0 to `final`."""
    run = root / "runs" / spec.run_id
    run.mkdir(parents=True)
    (run / "experiment.json").write_text(json.dumps({**spec.record("tiny"), "stage3": list(stage3)}))
    (run / "summary.json").write_text("{}")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"split": "eval", "step": step, "gold_reward": v, "reward_score": v, "kl": 0.0, "ref_logprob": -1.0,
         "length": 15}) for step, v in ((0, 0.0), (4, final))))


def table_rows(text: str) -> dict[str, list[str]]:
    """A markdown table's cells by calculator."""
    return {cells[0]: cells[1:] for line in text.splitlines() if line.startswith("| ") and "---" not in line
            for cells in [[c.strip() for c in line.strip("|").split("|")]] if cells[0] != "calculator"}


def section(readme: str, heading: str) -> str:
    """The text under a '#### heading' up to the next heading."""
    return readme.split(f"#### {heading}", 1)[1].split("#", 1)[0]


@pytest.mark.slow
def test_two_run_grid_writes_csv_plot_and_a_table_matching_the_csv(sft_runs, reward_runs, tmp_path, capsys):
    from experiments.report import METRIC_LABELS, SPEED_FRACTION, SPEED_WINDOW
    from experiments.run import main
    # the session's stage-1 model and reward model are given; no calculator here reads a discriminator
    args = ["--preset", "tiny", "--seeds", "1", "--steps", "4", "--eval_steps", "2",
            "--sft_model", str(sft_runs[1][2]), "--reward_model", str(reward_runs["sequence", 2]),
            "--calculators", "sparse", "abc", "--algos", "remax", "--settings", "main", "--diagnostic_samples", "8",
            "--parallel_runs", "2",
            "--out", str(tmp_path / "runs"), "--report_dir", str(tmp_path / "report")]
    main(args)
    out = capsys.readouterr().out
    assert out.count(": using ") == 2 and "disc:" not in out
    report = tmp_path / "report"
    for png in ("score_main_remax.png", "gold_main_remax.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(report / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["run_id"] for r in rows} == {"remax-sparse-s1", "remax-abc-s1"}
    a, b = (json.loads((tmp_path / "runs" / "runs" / run / "experiment.json").read_text())
            for run in ("remax-sparse-s1", "remax-abc-s1"))
    assert b["started"] < a["started"] + a["seconds"] and a["started"] < b["started"] + b["seconds"]  # at once
    assert sorted({int(r["step"]) for r in rows}) == [0, 2, 4]
    readme = (report / "README.md").read_text()
    assert "Before the grid" in readme and "Verdict: " in readme and (tmp_path / "runs" / "diagnostics.json").is_file()
    steps = np.array([0, 2, 4])
    for metric in ("reward_score", "gold_reward"):
        values = {c: np.array([float(r[metric]) for r in sorted((r for r in rows if r["calculator"] == c),
                                                                key=lambda r: int(r["step"]))])
                  for c in ("sparse", "abc")}
        smooth = {c: np.array([v[max(0, i - SPEED_WINDOW + 1):i + 1].mean() for i in range(len(v))])
                  for c, v in values.items()}
        start = np.mean([v[0] for v in values.values()])
        target = start + SPEED_FRACTION * (max(s.max() for s in smooth.values()) - start)
        table = table_rows(section(readme, METRIC_LABELS[metric]))
        assert set(table) == {"sparse", "abc"}
        assert f"{target:+.3f}" in section(readme, METRIC_LABELS[metric])
        first = {}
        for calc, v in values.items():
            seeds, mean_all, final, step, ratio, gain = table[calc]
            assert seeds == "1"
            assert float(mean_all) == pytest.approx(v.mean(), abs=6e-4)
            if calc == "abc":  # one seed, paired with sparse's
                assert float(gain.split()[0]) == pytest.approx(v.mean() - values["sparse"].mean(), abs=6e-4)
                assert gain.endswith(f"({int(v.mean() > values['sparse'].mean())} of 1)")
            else:
                assert gain == ""
            assert float(final.split("±")[0]) == pytest.approx(v[-1], abs=6e-4)
            reached = steps[smooth[calc] >= target - 1e-12]
            first[calc] = int(reached[0]) if len(reached) else None
            assert step == (str(first[calc]) if first[calc] is not None else "never")
        if first["abc"] is not None and first["sparse"]:
            assert float(table["abc"][4].split()[0]) == pytest.approx(first["abc"] / first["sparse"], abs=6e-3)
    assert re.search(r"runs finished: main 2 of 2 ", (report / "README.md").read_text())
    capsys.readouterr()
    main(args)  # a finished grid: models reused, runs skipped
    out = capsys.readouterr().out
    assert "2 stage-3 runs, 2 already finished" in out and out.count(": using ") == 2 and "disc:" not in out
    with pytest.raises(DensehfError, match="no such folder"):
        main([*args, "--sft_model", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="max_steps 4, but this grid asks for 6"):
        main([*args, "--steps", "6"])  # runs of another budget are not mixed into the report
