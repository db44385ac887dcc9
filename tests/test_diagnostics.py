"""The diagnostics run before any experiment grid (experiments/diagnostics.py): is the reward
model's attention a credit signal, and is ReMax's greedy baseline degenerate?"""
from __future__ import annotations

import json

import pytest
import torch


def test_normalised_entropy_by_hand():
    from experiments.diagnostics import normalised_entropy
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 9.0, 9.0], [5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    h = normalised_entropy(w, mask)
    # uniform over 4: 1; one-hot: 0; uniform over the 2 unmasked (the 9s are masked): 1; one token: undefined
    assert h[:3].tolist() == pytest.approx([1.0, 0.0, 1.0]) and torch.isnan(h[3])


def test_verdict_and_repetition():
    from experiments.diagnostics import repetitive, verdict
    assert verdict(0.97, 0.0).startswith("ABC cannot be tested with this reward model")
    assert verdict(0.5, float("nan")).startswith("ABC cannot be tested")
    assert verdict(0.6, 0.45).startswith("the reward model's attention carries credit")
    # the credit in another layer than the last (as measured on the tiny preset's reward model)
    assert verdict(0.61, 0.004, [0.49, 0.14, float("nan"), 0.01]).endswith(
        "Layer 0's attention does agree with occlusion (+0.49): `--abc_attention_layer 0` reads it, "
        "a variant of the published ABC")
    assert verdict(0.61, 0.004, [0.1, 0.14, 0.3]).endswith("needs 0.2)")  # the last layer is what ABC reads
    assert repetitive([5, 6, 5, 6, 5, 6, 5, 6]) and not repetitive([1, 2, 3, 4, 5, 6])


def test_diagnostic_on_a_tiny_model_flags_its_uniform_attention(imdb_task, tiny_model, tmp_path):
    """An untrained reward head on the tiny backbone: attention near uniform, no relation to what
    moves its score; the diagnostic must say ABC cannot be tested."""

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from common.gold import GoldScorer
    from common.presets import gold_scorer_path
    from experiments.diagnostics import diagnose, markdown
    tok = AutoTokenizer.from_pretrained(tiny_model)
    AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, pad_token_id=tok.pad_token_id).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    lines = (imdb_task / "prompts" / "eval.jsonl").read_text().splitlines()[:8]
    d = diagnose(tiny_model, str(tmp_path / "rm"), [json.loads(line)["prompt"] for line in lines],
                 GoldScorer.load(gold_scorer_path(imdb_task)), answer_len=8, batch=8)
    assert d.samples == 8 and d.attention_entropy > 0.9
    assert -1 <= d.attention_vs_occlusion <= 1 and -1 <= d.oracle_vs_occlusion <= 1
    # every layer is measured (near-uniform rows make ranks fragile: the eager last layer's need not
    # rank exactly as the scorer's recomputed row, whose equality tests/test_tokenmap_attention.py pins)
    assert len(d.by_layer) == 4 and all(-1 <= v <= 1 for v in d.by_layer)
    assert len(d.by_layer_vs_oracle) == 4 and all(-1 <= v <= 1 for v in d.by_layer_vs_oracle)
    assert "against the gold scorer's per-token credit" in markdown(d.as_dict())
    assert d.verdict.startswith("ABC cannot be tested with this reward model")
    assert "Verdict: ABC cannot be tested" in markdown(d.as_dict())
