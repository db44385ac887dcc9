"""--reward_model_type gold: the task's own scorer as the reward, the experiments' positive control.

With it the oracle calculator's credit is the exact split of R (the gold logit) over the response's
words, so what oracle gains over sparse is what exact credit can gain in a setting.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import step3_rlhf.main as stage3
from tests.conftest import read_metrics


def test_the_reward_is_the_gold_logit_of_prompt_and_response(imdb_task):
    from transformers import AutoTokenizer

    from common.gold import GoldScorer
    from common.presets import gold_scorer_path
    from step3_rlhf.scoring import GoldRewardScorer
    gold, tok = GoldScorer.load(gold_scorer_path(imdb_task)), AutoTokenizer.from_pretrained(imdb_task / "tokenizer")
    prompts, texts = ["This movie was", "I thought the film"], [" awful, a waste.", " was wonderful"]
    responses = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    scores, attention = GoldRewardScorer(gold, tok)(prompts, [[] for _ in prompts], responses, 8)
    np.testing.assert_allclose(scores.numpy(), gold.logit([p + t for p, t in zip(prompts, texts)]), rtol=1e-6)
    assert scores[0] < 0 < scores[1] and attention is None


def test_stage_3_with_the_gold_reward_optimises_what_evaluation_reports_as_gold(tiny_model, tmp_path):
    """No reward model is read (the default --reward_model_name_or_path does not exist here); every
    eval's reward score is its gold reward, and the oracle's token rewards sum to R."""
    out = tmp_path / "out"
    stage3.main([str(a) for a in [
        "--algo", "remax", "--reward_model_type", "gold", "--reward_calculator", "oracle",
        "--reward_model_name_or_path", tmp_path / "no_such_model",
        "--actor_model_name_or_path", tiny_model, "--data_path", "imdb", "--data_output_path", tmp_path / "cache",
        "--output_dir", out, "--actor_zero_stage", "0", "--reference_zero_stage", "0",
        "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4",
        "--max_prompt_seq_len", "8", "--max_answer_seq_len", "6", "--max_steps", "2", "--save_steps", "0",
        "--eval_steps", "1", "--max_eval_samples", "8", "--no-enable_tensorboard"]])
    evals = read_metrics(out, "eval")
    assert len(evals) == 3
    for row in evals:
        assert row["reward_score"] == pytest.approx(row["gold_reward"], abs=1e-5), row
    for row in read_metrics(out, "train"):
        assert row["dense_reward_sum"] == pytest.approx(row["reward_score"], abs=1e-5), row
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
