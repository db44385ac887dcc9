"""Stage 2 through the deepspeed launcher, 2 CPU ranks: both model types, ZeRO-2 and ZeRO-3."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch


pytestmark = pytest.mark.slow

from tests.conftest import (REWARD_EVAL_ROWS as EVAL_ROWS, REWARD_MAX_LEN as MAX_LEN, assert_same_export,
                            kill_and_resume, read_metrics, reward_args)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("zero", [2, 3])
def test_reward_model_beats_chance(reward_runs, zero):
    s = summary(reward_runs["sequence", zero])
    assert s["processes"] == 2 and s["zero_stage"] == zero
    assert s["final_eval"]["accuracy"] > 0.6, s["final_eval"]
    assert s["final_eval"]["margin"] > 0


@pytest.mark.parametrize("zero", [2, 3])
def test_discriminator_beats_chance_on_edited_tokens(reward_runs, zero):
    final = summary(reward_runs["token", zero])["final_eval"]
    assert final["edited_accuracy"] > 0.55, final
    assert final["p_positive_revised"] > final["p_positive_rejected"], final


def eval_pairs(tokenizer):
    from common.data.encode import encode_pair
    from common.data.loaders import read_file
    from common.data.schemas import PAIR
    from common.presets import task_dir
    rows = read_file(task_dir() / "pairs" / "eval.jsonl", PAIR)[:EVAL_ROWS]
    return [encode_pair(tokenizer, r, MAX_LEN, "raw", "truncate") for r in rows]


@pytest.mark.parametrize("zero", [2, 3])
def test_reward_export_reloads_with_the_engines_scores(reward_runs, zero):
    """The export, loaded by plain transformers, reproduces the trained engine's eval accuracy."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from common.data.batches import pad
    from common.heads import sequence_scores
    export = reward_runs["sequence", zero] / "hf_export"
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.num_labels == 1 and model.score.weight.shape[0] == 1
    pairs = eval_pairs(tokenizer)
    ids, mask = pad([p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs], tokenizer.pad_token_id)
    with torch.no_grad():
        scores = sequence_scores(model, ids, mask)
        native = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    n = len(pairs)
    accuracy = (scores[:n] > scores[n:]).float().mean().item()
    assert accuracy == pytest.approx(summary(reward_runs["sequence", zero])["final_eval"]["accuracy"], abs=1e-6)
    # other tools read the same score (right padding, pad distinct from EOS)
    torch.testing.assert_close(native, scores, rtol=1e-4, atol=1e-4)


def test_discriminator_export_reloads(reward_runs):
    from transformers import AutoModelForTokenClassification
    export = reward_runs["token", 3] / "hf_export"
    model = AutoModelForTokenClassification.from_pretrained(export)
    assert model.config.num_labels == 2 and model.score.bias is None
    assert json.loads((export / "densehf_stage.json").read_text())["kind"] == "token"


@pytest.mark.parametrize("kind,zero,start,end", [("sequence", 2, 150, 160), ("token", 3, 30, 40)])
def test_resume_after_kill_matches_uninterrupted(reward_runs, sft_runs, tmp_path, kind, zero, start, end):
    """Resumed from a copy of the uninterrupted run's step-`start` checkpoint, SIGKILLed at a seeded
    random step before the next one, --resume: the same export, bit for bit, and the same training
    losses after the resume point (same data order)."""
    kill_at = random.Random(f"{kind}{zero}").randint(start + 1, end - 1)
    reference, run = reward_runs[kind, zero], tmp_path / "killed"
    kill_and_resume("step2_reward/main.py", reward_args(kind, zero, sft_runs[1][2], run, reference.parent / "cache"),
                    kill_at, start_from=(reference, start))
    assert_same_export(run / "hf_export", reference / "hf_export")
    losses = [{r["step"]: r["loss"] for r in read_metrics(out, "train") if r["step"] > start} for out in (run, reference)]
    assert losses[0] == losses[1] and len(losses[0]) == end - start
