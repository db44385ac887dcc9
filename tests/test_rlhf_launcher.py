"""Stage 3 through the deepspeed launcher, 2 CPU ranks: every algorithm, ZeRO-2 and ZeRO-3.

Each configuration runs uninterrupted; a second run resumes from a copy of one of its
checkpoints, is killed (SIGKILL) a step later and resumed again: the final exports must be
identical. RLOO's second run is first stopped by SIGTERM, then killed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_same_export, copy_checkpoints, kill_and_resume, launch, launch_two_nodes

pytestmark = pytest.mark.slow

# The three that must raise the held-out reward (RISING) train at actor lr 4e-4: at 2e-4, on the
# session's models of 2026-12-06, 16 steps gained ReMax +0.058 and GRPO +0.047 against the test's
# +0.05 margin (a failure on one machine's numerics, a pass on another's); at 4e-4 they gained
# +0.66 and +0.11, REINFORCE++ +0.11 (+0.12 at 2e-4).
CONFIGS = {
    # ReMax with ABC, the actor (and reference, reward model) under ZeRO-3: generation gathers
    # (32 samples a step; at 16 samples the gain was within noise)
    "remax_zero3": dict(algo="remax", calculator="abc", actor=3, frozen=3, steps=16, batch=16, lr=4e-4, extra=[
        "--reward_dropout", "none"]),
    # PPO with a composite of ABC-D and TLCR, quantile reward dropout, EMA, ZeRO-2
    "ppo_zero2": dict(algo="ppo", calculator="composite", actor=2, frozen=0, steps=6, batch=8, extra=[
        "--composite_weights", "abc_d:0.5,tlcr:0.5", "--reward_dropout", "quantile",
        "--reward_dropout_rate", "0.5", "--enable_ema", "--ema_decay", "0.9"]),
    # RLOO over dense (uniform) rewards: 4 prompts x 2 answers per rank in one generate call
    "rloo_zero2": dict(algo="rloo", calculator="uniform", actor=2, frozen=0, steps=6, batch=4, extra=[
        "--num_generations", 2, "--reward_dropout", "none"]),
    # GRPO over ABC's dense rewards with the per-token baseline, everything under ZeRO-3: 4 prompts
    # x 4 answers per rank
    "grpo_zero3": dict(algo="grpo", calculator="abc", actor=3, frozen=3, steps=16, batch=4, lr=4e-4, extra=[
        "--num_generations", 4, "--dense_baseline", "per_token", "--reward_dropout", "none"]),
    # REINFORCE++ over ABC-D (the policy's own attention), ZeRO-2
    "reinforce_pp_zero2": dict(algo="reinforce_pp", calculator="abc_d", actor=2, frozen=0, steps=16, batch=8,
                               lr=4e-4, extra=["--reward_dropout", "none"]),
}
RISING = ("remax_zero3", "grpo_zero3", "reinforce_pp_zero2")  # long enough for the held-out reward to rise


def rl_args(name: str, actor: Path, reward_runs: dict, out: Path, cache: Path) -> list:
    c = CONFIGS[name]
    return ["--algo", c["algo"], "--reward_calculator", c["calculator"],
            "--actor_model_name_or_path", actor,
            "--reward_model_name_or_path", reward_runs["sequence", 2],
            "--discriminator_model_name_or_path", reward_runs["token", 2],
            "--data_path", "imdb", "--data_output_path", cache, "--output_dir", out,
            "--actor_zero_stage", c["actor"], "--critic_zero_stage", c["actor"],
            "--reference_zero_stage", c["frozen"], "--reward_zero_stage", c["frozen"],
            "--per_device_generation_batch_size", c["batch"],
            "--per_device_training_batch_size", c["batch"] * _generations(c) // 2,
            "--max_prompt_seq_len", 12, "--max_answer_seq_len", 10, "--max_steps", c["steps"],
            "--actor_learning_rate", c.get("lr", 2e-4), "--critic_learning_rate", 2e-4, "--kl_ctl", 0.02,
            "--save_steps", 3, "--save_total_limit", 3, "--eval_steps", 0, "--max_eval_samples", 64, "--log_steps", 3,
            *c["extra"]]


def _generations(config: dict) -> int:
    extra = config["extra"]
    return int(extra[extra.index("--num_generations") + 1]) if "--num_generations" in extra else 1


@pytest.fixture(scope="module")
def rl_runs(sft_runs, reward_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("rlhf")
    actor = sft_runs[1][2]
    out = {}
    for name in CONFIGS:
        out[name] = root / name
        launch("step3_rlhf/main.py", rl_args(name, actor, reward_runs, out[name], root / "cache"))
    return root, out


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_runs_and_exports(rl_runs, name):
    from transformers import AutoModelForCausalLM
    _, out = rl_runs
    s = summary(out[name])
    assert s["processes"] == 2 and s["steps"] == CONFIGS[name]["steps"]
    assert s["initial_eval"]["kl"] == pytest.approx(0.0, abs=1e-5)  # actor == reference at start
    assert s["final_eval"]["kl"] != 0.0
    assert s["initial_eval"]["ref_logprob"] < 0 and s["final_eval"]["ref_logprob"] < 0  # log pi_ref(response)
    AutoModelForCausalLM.from_pretrained(out[name] / "hf_export")
    rows = [json.loads(line) for line in (out[name] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert {"reward_score", "kl", "length", "actor_loss", "entropy"} <= set(train[-1])
    if name == "ppo_zero2":
        assert (out[name] / "hf_export_ema" / "model.safetensors").is_file()
        assert {"critic_loss", "clip_fraction", "value"} <= set(train[-1])
        assert train[-1]["kept"] == pytest.approx(0.5)  # quantile 0.5 keeps half of the global batch
    if name in ("rloo_zero2", "grpo_zero3", "reinforce_pp_zero2"):
        assert "return" in train[-1] and "greedy_score" not in train[-1]


@pytest.mark.parametrize("name", RISING)
def test_the_held_out_reward_rises(rl_runs, name):
    """Seeded: 16 steps of ReMax, GRPO and REINFORCE++ over dense rewards move the held-out
    reward-model score up by a clear margin."""
    _, out = rl_runs
    s = summary(out[name])
    assert s["final_eval"]["reward_score"] > s["initial_eval"]["reward_score"] + 0.05, s
    assert "gold_reward" in s["final_eval"]


# (checkpoint copied, step killed after): the 16-step runs keep steps 12, 15 and 16, the 6-step 3 and
# 6. Killed after the last step, a run has done it but not saved it: the resume redoes it. (RLOO's
# chain is the SIGTERM test's.)
@pytest.mark.parametrize("name,start,kill_at", [("remax_zero3", 15, 16), ("ppo_zero2", 3, 4),
                                                ("grpo_zero3", 15, 16), ("reinforce_pp_zero2", 15, 16)])
def test_resume_after_kill_matches_uninterrupted(rl_runs, sft_runs, reward_runs, name, start, kill_at):
    root, out = rl_runs
    run = root / f"{name}_killed"
    args = rl_args(name, sft_runs[1][2], reward_runs, run, root / "cache")
    kill_and_resume("step3_rlhf/main.py", args, kill_at, start_from=(out[name], start))
    assert summary(run)["initial_eval"] == summary(out[name])["initial_eval"]  # kept across the kill
    exports = ["hf_export"] + (["hf_export_ema"] if name == "ppo_zero2" else [])
    for export in exports:
        assert_same_export(run / export, out[name] / export)


def test_sigterm_stops_stage_3_with_a_checkpoint_then_a_kill_and_resume_match(rl_runs, sft_runs, reward_runs):
    """RLOO resumed from the uninterrupted run's step 3, SIGTERM to the launcher after step 4: the
    ranks save at the step boundary and stop. Resumed from there and SIGKILLed after the last step
    (done, not saved), then resumed again: the uninterrupted run's weights."""
    root, out = rl_runs
    run = root / "rloo_terminated"
    args = rl_args("rloo_zero2", sft_runs[1][2], reward_runs, run, root / "cache")
    copy_checkpoints(out["rloo_zero2"], run, 3)  # from the uninterrupted run's step 3
    stopped = launch("step3_rlhf/main.py", [*args, "--resume"], env={"DENSEHF_TERM_AT_STEP": "4@0"},
                     expect_ok=False)
    assert stopped.returncode != 0 and "preempted: SIGTERM" in stopped.stderr, stopped.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() in ("step00000004", "step00000005")
    killed = launch("step3_rlhf/main.py", [*args, "--resume"],
                    env={"DENSEHF_KILL_AT_STEP": str(CONFIGS["rloo_zero2"]["steps"])}, expect_ok=False)
    assert killed.returncode != 0 and not (run / "hf_export").exists(), "the kill did not happen"
    launch("step3_rlhf/main.py", [*args, "--resume"])
    assert summary(run)["initial_eval"] == summary(out["rloo_zero2"])["initial_eval"]
    assert_same_export(run / "hf_export", out["rloo_zero2"] / "hf_export")


def test_two_nodes_on_one_machine_give_the_single_node_weights(rl_runs, sft_runs, reward_runs, tmp_path):
    root, out = rl_runs
    run = root / "rloo_two_nodes"
    launch_two_nodes("step3_rlhf/main.py", rl_args("rloo_zero2", sft_runs[1][2], reward_runs, run, root / "cache"),
                     tmp_path)
    assert_same_export(run / "hf_export", out["rloo_zero2"] / "hf_export")
