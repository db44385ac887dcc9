"""Stage 1 through the real deepspeed launcher, 2 CPU ranks, ZeRO-2 and ZeRO-3."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import (SFT_STEPS as STEPS, assert_same_export, copy_checkpoints, launch, launch_two_nodes,
                            read_metrics, sft_args)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("zero", [2, 3])
def test_loss_falls_and_outputs_exist(sft_runs, zero):
    _, out = sft_runs
    evals = read_metrics(out[zero], "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == STEPS
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0, evals
    summary = json.loads((out[zero] / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["zero_stage"] == zero and summary["steps"] == STEPS
    assert list((out[zero] / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert (out[zero] / "hf_export" / "model.safetensors").is_file()


@pytest.mark.parametrize("zero", [2, 3])
def test_export_reloads_with_engine_logits(sft_runs, zero, tiny_model):
    """The HF export, loaded with no densehf code, equals the engine's own final weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, out = sft_runs
    export = out[zero] / "hf_export"
    exported = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    ckpt = out[zero] / "checkpoints" / (out[zero] / "checkpoints" / "latest").read_text().strip()
    engine_sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "model"), tag="state")
    engine_model = AutoModelForCausalLM.from_pretrained(export).eval()
    engine_model.load_state_dict(engine_sd, strict=False)
    ids = tokenizer(["This movie was", "I did not like the"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = exported(**ids).logits
        b = engine_model(**ids).logits
    assert torch.equal(a, b)
    untrained = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(exported.lm_head.weight, untrained.lm_head.weight), "export is untrained"


def test_sigterm_checkpoints_then_a_kill_and_a_truncated_shard_resume_to_the_same_weights(sft_runs, tiny_model):
    """One preempted run's life, against the uninterrupted ZeRO-3 run:
    - resumed from copies of its checkpoints 15 and 20, SIGTERM to the deepspeed launcher after
      step 21 (as SLURM or Kubernetes would): it forwards it to one rank; the ranks agree at the
      step boundary, both save and stop;
    - resumed from there, SIGKILLed after step 23;
    - the largest file of the newest checkpoint then cut short, as a crash during a copy leaves
      it: --resume says so, resumes from step 20, logs the uninterrupted run's losses from there
      and ends with its weights."""
    root, out = sft_runs
    run = root / "terminated"
    args = [*sft_args(tiny_model, run, 3, root / "cache"), "--resume"]
    copy_checkpoints(out[3], run, 15, 20)
    stopped = launch("step1_sft/main.py", args, env={"DENSEHF_TERM_AT_STEP": "21@0"}, expect_ok=False)
    assert stopped.returncode != 0 and "preempted: SIGTERM" in stopped.stderr, stopped.stderr[-3000:]
    # the launcher's signal arrives while step 21 or 22 runs: the ranks stop at the boundary after it
    newest = (run / "checkpoints" / "latest").read_text().strip()
    assert newest in ("step00000021", "step00000022")
    killed = launch("step1_sft/main.py", args, env={"DENSEHF_KILL_AT_STEP": "23"}, expect_ok=False)
    assert killed.returncode != 0 and f"resumed from step {int(newest[4:])}" in killed.stdout + killed.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == newest
    shard = max((f for f in (run / "checkpoints" / newest).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    resumed = launch("step1_sft/main.py", args)
    assert "is damaged" in resumed.stdout + resumed.stderr
    damaged = json.loads((run / "summary.json").read_text())["damaged_checkpoints"]
    assert len(damaged) == 1 and damaged[0].startswith(f"{newest}: ") and shard.name in damaged[0]
    assert_same_export(run / "hf_export", out[3] / "hf_export")
    # the losses logged after the resume point (the last run's rows come last) are the uninterrupted ones
    resumed_losses = {r["step"]: r["loss"] for r in read_metrics(run, "train") if r["step"] > 20}
    reference_losses = {r["step"]: r["loss"] for r in read_metrics(out[3], "train") if r["step"] > 20}
    assert resumed_losses == reference_losses and len(resumed_losses) == STEPS - 20


def test_two_nodes_on_one_machine_give_the_single_node_weights(sft_runs, tiny_model, tmp_path):
    """The hostfile/SLURM path: two launchers as nodes 0 and 1 (one rank each), ZeRO-3, the same
    seed as the single-node 2-process run: the same export."""
    root, out = sft_runs
    run = root / "two_nodes"
    launch_two_nodes("step1_sft/main.py", sft_args(tiny_model, run, 3, root / "cache"), tmp_path)
    assert_same_export(run / "hf_export", out[3] / "hf_export")
