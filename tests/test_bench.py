"""The benchmarks run end to end on CPU (tiny shapes) and write the results they promise.

Nothing here asserts a speed: only that each script measures what it says (the same
samples for every variant, the phases that should be non-zero are) and writes its JSON.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, launch

sys.path.insert(0, str(REPO / "bench"))


def run_bench(script: str, *args, out) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *map(str, args), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert {"nproc", "cpu", "date", "torch"} <= set(result["machine"])
    return result


def test_summarise_and_phase_timer():
    from harness import PhaseTimer, summarise
    s = summarise([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]

    class Owner:
        def work(self, x):
            return x + 1
    owner, timer = Owner(), PhaseTimer()
    timer.wrap(owner, "work", "phase")
    assert owner.work(1) == 2 and owner.work(2) == 3
    assert timer.totals["phase"] > 0


WORKER = """
import json, os, sys, time
print("RESULT " + json.dumps({"tokens_per_s": 123.0}), flush=True)
print("progress goes to stderr", file=sys.stderr, flush=True)
if sys.argv[1] == "crash":
    os.abort()                      # as NCCL teardown does, after the number was printed
if sys.argv[1] == "hang":
    time.sleep(600)
"""


@pytest.mark.parametrize("how,ended", [("ok", None), ("crash", {"exit_code": -6}),
                                       ("hang", {"exit_code": -9, "timed_out_after_s": 3})])
def test_spawn_keeps_a_result_printed_before_a_crash_or_a_timeout(tmp_path, how, ended):
    from harness import spawn
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    result = spawn(str(worker), [how], timeout=3)
    assert result["tokens_per_s"] == 123.0 and result.get("worker_ended") == ended


def test_spawn_without_a_result_is_an_error(tmp_path):
    from harness import spawn
    worker = tmp_path / "worker.py"
    worker.write_text("import sys; sys.exit(3)")
    with pytest.raises(RuntimeError, match="no result"):
        spawn(str(worker), [], timeout=30)


def test_model_folders_share_weights_across_heads(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from harness import model_folder, n_params
    monkeypatch.setenv("DENSEHF_CACHE", str(tmp_path))
    causal = AutoModelForCausalLM.from_pretrained(model_folder("tiny"))
    reward = AutoModelForSequenceClassification.from_pretrained(model_folder("tiny", "reward"))
    assert sum(p.numel() for p in causal.parameters()) == n_params("tiny")
    assert reward.config.num_labels == 1
    torch.testing.assert_close(causal.model.embed_tokens.weight, reward.model.embed_tokens.weight)
    tok = AutoTokenizer.from_pretrained(model_folder("tiny"))
    assert len(tok) == causal.config.vocab_size and tok.pad_token_id != tok.eos_token_id


def test_calculator_benchmark(tmp_path):
    r = run_bench("cpu_calculators.py", "--shape", "tiny", "--batch", 2, "--answer_len", 4, "--repeats", 2,
                  "--warmup", 0, out=tmp_path / "calc.json")
    assert len(set(r["response_tokens"].values())) == 1  # the same samples for every calculator
    sec = {n: {ph: v["median"] for ph, v in s.items()} for n, s in r["seconds"].items()}
    assert sec["tlcr"]["discriminator"] > 0 and sec["sparse"]["discriminator"] == 0
    assert sec["abc_d"]["policy_attention"] > 0 and sec["abc"]["policy_attention"] == 0
    assert r["ratio_vs_sparse"]["sparse"]["step"]["median"] == 1.0
    assert {"abc", "abc_d", "tlcr"} <= set(r["overhead_share_of_step"])


@pytest.mark.slow
def test_scaling_benchmark(tmp_path):
    r = run_bench("cpu_scaling.py", "--shape", "tiny", "--answer_lens", 4, 8, "--batches", 2, "--base_batch", 2,
                  "--base_answer_len", 4, "--repeats", 1, out=tmp_path / "scaling.json")
    configs = {(c["batch"], c["answer_len"]): c for c in r["configs"]}
    assert set(configs) == {(2, 4), (2, 8)}
    assert configs[2, 8]["response_tokens"] > configs[2, 4]["response_tokens"]


@pytest.mark.slow
def test_algorithm_benchmark(tmp_path):
    r = run_bench("algos.py", "--shape", "tiny", "--batch", 2, "--answer_len", 4, "--rounds", 1, "--steps", 1,
                  out=tmp_path / "algos.json")
    remax, ppo = r["algos"]["remax"], r["algos"]["ppo"]
    assert ppo["seconds"]["critic_values"]["median"] > 0 and remax["seconds"]["critic_values"]["median"] == 0
    for a in (remax, ppo):
        mem = {k: v["median"] for k, v in a["memory_bytes"].items()}
        assert mem["rss_before_build"] < mem["rss_after_build"] <= mem["peak_rss_bytes"]
    assert {"step_time", "peak_rss_bytes", "peak_rss_above_imports"} <= set(r["remax_over_ppo"])


@pytest.mark.slow
def test_algorithm_benchmark_runs_group_estimators_on_the_same_prompts(tmp_path):
    r = run_bench("algos.py", "--shape", "tiny", "--batch", 2, "--answer_len", 4, "--rounds", 1, "--steps", 1,
                  "--algos", "grpo@2", "rloo@3", out=tmp_path / "algos.json")
    grpo, rloo = r["algos"]["grpo@2"], r["algos"]["rloo@3"]
    for a in (grpo, rloo):
        assert a["seconds"]["train"]["median"] > 0 and a["seconds"]["critic_values"]["median"] == 0
    # samples/s counts the k answers to each prompt: 2 x 3 answers in a step of about the same length
    assert rloo["samples_per_s"]["median"] * rloo["seconds"]["step"]["median"] == pytest.approx(6, rel=0.01)
    assert grpo["samples_per_s"]["median"] * grpo["seconds"]["step"]["median"] == pytest.approx(4, rel=0.01)


@pytest.mark.slow
def test_rollout_engines_benchmark(tmp_path):
    pytest.importorskip("vllm")
    r = run_bench("cpu_rollout_engines.py", "--shape", "tiny", "--algos", "remax", "--batches", 2,
                  "--answer_lens", 4, "--steps", 1, out=tmp_path / "engines.json")
    (row,) = r["configs"]
    # answers held to full length: 2 samples + 2 greedy answers of 4 tokens, with either engine
    assert row["hf"]["generated_tokens"] == row["vllm"]["generated_tokens"] == 16
    assert row["vllm"]["seconds"]["weight_sync"]["median"] > 0
    assert set(row["vllm_over_hf"]) == {"samples_per_s", "generation_tokens_per_s"}


@pytest.mark.slow
def test_zero3_generation_benchmark(tmp_path):
    out = tmp_path / "zero3.json"
    launch("bench/zero3_generation.py", ["--shape", "tiny", "--batch", 2, "--answer_len", 4, "--repeats", 1,
                                         "--out", out])
    r = json.loads(out.read_text())
    assert r["ranks"] == 2 and r["same_tokens"]
    assert set(r["tokens_per_s_per_rank"]) == {"gather_once", "per_layer_default"}


@pytest.mark.slow
def test_gpu_train_script_small(tmp_path):
    """The reward model's worker (the first-run dry run below times the SFT one)."""
    r = run_bench("gpu_train.py", "--small", "--models", "reward", out=tmp_path / "train.json")
    assert set(r["models"]) == {"reward"}
    for m in r["models"].values():
        assert m["tokens_per_s"]["median"] > 0 and 0 < m["mfu"]["median"] <= m["mfu_forward_backward"]["median"]


@pytest.mark.slow
def test_gpu_stage3_script_small(tmp_path):
    """The recipe's own flags and the decode worker (the dry run below runs ReMax and PPO without them)."""
    r = run_bench("gpu_stage3.py", "--small", "--algos", "ppo", out=tmp_path / "stage3.json")
    assert set(r["stage3"]["algos"]) == {"ppo"}
    assert "--offload" not in r["stage3"]["extra_flags"]  # --small drops the recipe's offload (a JIT build on CPU)
    d = r["decode_batch1"]
    assert d["decode_tokens_per_s"] > 0 and d["weight_bytes"] == 4 * r["parameters"]


@pytest.mark.slow
def test_gpu_first_run_dry_run_on_cpu(tmp_path):
    """The first GPU attempt cannot fail on an argument or an import: the same script, tiny shapes."""
    import os
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_first_run.sh"), "--dry-run"], cwd=REPO,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=900)
    log = (tmp_path / "log.txt").read_text() if (tmp_path / "log.txt").is_file() else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + log[-6000:]
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [x["part"] for x in lines] == ["machine", "models", "rlhf_1b3", "sft_7b", "remax_7b"]
    assert all(x["rc"] == 0 and x["result"] for x in lines), (lines, log[-6000:])
    parts = {x["part"]: x["result"] for x in lines}
    assert parts["machine"]["deepspeed"] and parts["machine"]["cuda_available"] is False
    assert set(parts["rlhf_1b3"]["stage3"]["algos"]) == {"remax", "ppo"}
    assert "decode_batch1" not in parts["rlhf_1b3"]
    assert parts["sft_7b"]["models"]["sft"]["tokens_per_s"]["median"] > 0
    sft = parts["sft_7b"]["models"]["sft"]
    assert sft["mfu_8n"]["median"] == pytest.approx(sft["mfu"]["median"] * 8 / 6)
    assert parts["remax_7b"]["stage3"]["algos"]["remax"]["samples_per_s"]["median"] > 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("\n| ") == 5 and "no result" not in summary and "samples/s" in summary


def test_first_run_summary_shows_failed_and_timed_out_parts():
    from first_run_summary import summary
    text = summary([{"part": "machine", "rc": 0, "seconds": 3.0, "result": {"gpu": "NVIDIA H200, 143771 MiB"}},
                    {"part": "sft_7b", "rc": 124, "timed_out": True, "seconds": 110.0, "result": None},
                    {"part": "remax_7b", "rc": 1, "seconds": 20.0, "result": None}])
    rows = text.splitlines()[2:]
    assert rows[0].startswith("| machine | 0 | 3.0 | NVIDIA H200")
    assert rows[1] == "| sft_7b | timed out | 110.0 | no result |" and rows[2] == "| remax_7b | 1 | 20.0 | no result |"
