"""TLCR token labels: hand-checked alignments, then label positions on a real (tiny) tokenizer."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import DataError
from common.token_labels import (IGNORE, NEGATIVE, NEUTRAL, POSITIVE, Skip, align_labels,
                                 encode_revision, label_file, label_revision)

REPO = Path(__file__).resolve().parent.parent
N, P, G = NEUTRAL, POSITIVE, NEGATIVE


# ---- the alignment on integer tokens ------------------------------------------------------
@pytest.mark.parametrize("rejected, revised, want_rejected, want_revised", [
    ([1, 2, 3], [1, 2, 9, 3], [N, N, N], [N, N, P, N]),             # insertion
    ([1, 2, 9, 3], [1, 2, 3], [N, N, G, N], [N, N, N]),             # deletion
    ([1, 2, 3], [1, 7, 3], [N, G, N], [N, P, N]),                   # substitution
    ([1, 2, 3], [1, 2, 3], [N, N, N], [N, N, N]),                   # identical
    ([], [4, 5], [], [P, P]),                                       # empty rejected
    ([4, 5], [], [G, G], []),                                       # empty revised
    ([], [], [], []),
    ([8, 1, 2, 3], [1, 2, 3, 9], [G, N, N, N], [N, N, N, P]),       # edits at both ends
    ([1, 2, 3, 4], [7, 2, 3, 8, 9], [G, N, N, G], [P, N, N, P, P]),  # subs at the ends + insert
    ([1, 2], [2, 1], [N, G], [P, N]),             # a swap keeps one token rather than two subs
    ([1, 2, 1], [1], [G, G, N], [N]),             # ties: repeats align to their latest occurrence
])
def test_hand_checked_alignments(rejected, revised, want_rejected, want_revised):
    assert align_labels(rejected, revised) == (want_rejected, want_revised)


def reference(a: list[int], b: list[int]) -> tuple[int, int]:
    """(edit distance, most unchanged tokens among minimum-distance alignments): plain DP."""
    d = [[(0, 0)] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        for j in range(len(b) + 1):
            if i == 0 or j == 0:
                d[i][j] = (i + j, 0)
                continue
            match = a[i - 1] == b[j - 1]
            cost, neg_matches = d[i - 1][j - 1]
            options = [(cost + (not match), neg_matches - match),
                       (d[i - 1][j][0] + 1, d[i - 1][j][1]), (d[i][j - 1][0] + 1, d[i][j - 1][1])]
            d[i][j] = min(options)
    return d[-1][-1][0], -d[-1][-1][1]


def cost_of(a, b, rej_labels, rev_labels) -> tuple[int, int]:
    """Distance of the alignment the labels imply: unchanged tokens pair up in order, and
    each gap between them costs its longer side (substitute, then insert or delete)."""
    kept_a = [i for i, label in enumerate(rej_labels) if label == NEUTRAL]
    kept_b = [j for j, label in enumerate(rev_labels) if label == NEUTRAL]
    assert [a[i] for i in kept_a] == [b[j] for j in kept_b]  # unchanged means equal
    bounds = list(zip([-1] + kept_a, [-1] + kept_b)) + [(len(a), len(b))]
    cost = sum(max(i1 - i0 - 1, j1 - j0 - 1) for (i0, j0), (i1, j1) in zip(bounds, bounds[1:]))
    return cost, len(kept_a)


def test_random_alignments_are_optimal_and_keep_most_tokens():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(4) for _ in range(rng.randrange(12))]
        b = [rng.randrange(4) for _ in range(rng.randrange(12))]
        rej, rev = align_labels(a, b)
        assert len(rej) == len(a) and len(rev) == len(b)
        assert set(rej) <= {NEUTRAL, NEGATIVE} and set(rev) <= {NEUTRAL, POSITIVE}
        assert cost_of(a, b, rej, rev) == reference(a, b), (a, b)


def test_long_responses_align():
    rng = random.Random(1)
    a = [rng.randrange(1000) for _ in range(512)]
    b = a[:100] + [5000] + a[100:300] + a[310:]
    rej, rev = align_labels(a, b)
    assert [i for i, label in enumerate(rej) if label == NEGATIVE] == list(range(300, 310))
    assert [j for j, label in enumerate(rev) if label == POSITIVE] == [100]


# ---- a real tokenizer -------------------------------------------------------------------
SENTENCES = [f"The {noun} was {adj} and the acting was {adj2}. I really {verb} it."
             for noun in ("movie", "film", "plot", "story")
             for adj, adj2 in (("good", "boring"), ("bad", "great"),
                               ("great", "bad"), ("boring", "good"))
             for verb in ("liked", "hated")]
PROMPT = "Review this movie:"


def make_tokenizer(add_bos: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES + [PROMPT], trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def decode_labelled(tokenizer, example: dict, label: int) -> str:
    return tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l == label])


def test_labels_line_up_with_the_changed_words(tokenizer):
    rejected, revised = label_revision(tokenizer, PROMPT, "The movie was bad and boring.",
                                       "The movie was really good and boring.", max_seq_len=64)
    assert decode_labelled(tokenizer, rejected, NEGATIVE) == " bad"
    assert decode_labelled(tokenizer, revised, POSITIVE) == " really good"
    assert decode_labelled(tokenizer, revised, NEUTRAL) == "The movie was and boring.</s>"
    assert POSITIVE not in rejected["labels"] and NEGATIVE not in revised["labels"]


def test_deletion_labels_only_the_rejected_side(tokenizer):
    rejected, revised = label_revision(tokenizer, "", "I really liked it.", "I liked it.", 64)
    assert decode_labelled(tokenizer, rejected, NEGATIVE) == " really"
    assert set(revised["labels"]) == {NEUTRAL}


def test_prompt_is_ignored_and_eos_is_neutral(tokenizer):
    prompt_len = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    for example in label_revision(tokenizer, PROMPT, "The plot was bad.", "The plot was good.", 64):
        assert len(example["labels"]) == len(example["input_ids"])
        assert example["labels"][:prompt_len] == [IGNORE] * prompt_len
        assert IGNORE not in example["labels"][prompt_len:]
        assert example["input_ids"][-1] == tokenizer.eos_token_id and example["labels"][-1] == NEUTRAL
        assert example["input_ids"][0] != tokenizer.bos_token_id  # this tokenizer adds no BOS


def test_bos_first_when_the_tokenizer_adds_it():
    tok = make_tokenizer(add_bos=True)
    for example in label_revision(tok, PROMPT, "The plot was bad.", "The plot was good.", 64):
        assert example["input_ids"][0] == tok.bos_token_id and example["labels"][0] == IGNORE


def test_long_prompt_keeps_its_last_tokens(tokenizer):
    prompt = " ".join(SENTENCES[:6])
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for example in label_revision(tokenizer, prompt, "The film was bad.", "The film was good.", 16):
        kept = example["labels"].count(IGNORE)
        assert len(example["input_ids"]) <= 16 and kept == 8
        assert example["input_ids"][:kept] == prompt_ids[-kept:]


@pytest.mark.parametrize("rejected, revised, reason", [
    ("The film was good.", "The film was good.", "revision identical to rejected"),
    ("The film was good.", "  \n", "empty revised"),
    ("", "The film was good.", "empty rejected"),
    (" ".join(SENTENCES[:3]) + " bad", " ".join(SENTENCES[:3]) + " good",
     "every edit past max_seq_len=16"),
])
def test_rows_without_signal_are_skipped_with_a_reason(tokenizer, rejected, revised, reason):
    assert label_revision(tokenizer, PROMPT, rejected, revised, 16) == Skip(reason)


def test_stage2_encoder_uses_the_pipeline_prompt(tokenizer):
    row = {"prompt": PROMPT, "rejected": "The film was bad.", "revised": "The film was good."}
    rejected, revised = encode_revision(tokenizer, row, 64, "raw", "truncate")
    assert rejected["input_ids"][0] == tokenizer.bos_token_id  # every stage puts BOS first
    assert decode_labelled(tokenizer, revised, POSITIVE) == " good"
    assert encode_revision(tokenizer, row, 8, "raw", "skip") is None
    assert encode_revision(tokenizer, {**row, "revised": row["rejected"]}, 64, "raw", "skip") == \
        Skip("revision identical to rejected")


# ---- files and the CLI ------------------------------------------------------------------
ROWS = [{"prompt": PROMPT, "rejected": "The story was bad.", "revised": "The story was great."},
        {"prompt": PROMPT, "rejected": "The story was bad.", "revised": "The story was bad."},
        {"prompt": PROMPT, "rejected": "The story was bad.", "revised": " "},
        {"prompt": "", "rejected": "I hated it.", "revised": "I really liked it."}]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_label_file_counts_skips(tmp_path, tokenizer):
    path = write_lines(tmp_path / "rev.jsonl", [json.dumps(r) for r in ROWS] + [""])
    examples, skipped = label_file(path, tokenizer, 64)
    assert len(examples) == 4
    assert skipped == {"revision identical to rejected": 1, "empty revised": 1}
    assert decode_labelled(tokenizer, examples[3], POSITIVE) == " really liked"


@pytest.mark.parametrize("line, where, message", [
    ('{"prompt": "a", "rejected": "b"', "rev.jsonl:2", "malformed JSON"),
    ('{"prompt": "a", "rejected": "b"}', "rev.jsonl:2: field 'revised'", "missing"),
    ('{"prompt": "a", "rejected": "b", "revisd": "c"}', "rev.jsonl:2: field 'revised'", "misspelled"),
    ('{"prompt": "a", "rejected": 3, "revised": "c"}', "rev.jsonl:2: field 'rejected'",
     "expected a string"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, tokenizer, line, where, message):
    path = write_lines(tmp_path / "rev.jsonl", [json.dumps(ROWS[0]), line])
    with pytest.raises(DataError) as e:
        label_file(path, tokenizer, 64)
    assert e.value.where == str(tmp_path / where) and message in e.value.message


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "data" / "label_revisions.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_labels_a_file_and_shows_tokens(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    source = write_lines(tmp_path / "rev.jsonl", [json.dumps(r) for r in ROWS])
    output = tmp_path / "out" / "labelled.jsonl"
    proc = run_cli("--input", str(source), "--tokenizer", str(tmp_path / "tok"),
                   "--max_seq_len", "64", "--output", str(output), "--show", "2")
    assert proc.returncode == 0, proc.stderr
    assert "2 rows labelled -> 4 examples" in proc.stdout
    assert "1 revision identical to rejected" in proc.stdout and "1 empty revised" in proc.stdout
    assert "' great'                 POSITIVE" in proc.stdout
    assert "' bad'                   NEGATIVE" in proc.stdout
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert lines == label_file(source, tokenizer, 64)[0]
    assert [p.name for p in output.parent.iterdir()] == ["labelled.jsonl"]  # no temp file left


def test_cli_reports_bad_rows_and_helps(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    source = write_lines(tmp_path / "rev.jsonl", [json.dumps(ROWS[0]), "{oops"])
    output = tmp_path / "labelled.jsonl"
    proc = run_cli("--input", str(source), "--tokenizer", str(tmp_path / "tok"), "--output", str(output))
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {source}:2: malformed JSON")
    assert not output.exists()
    assert "NEGATIVE" in run_cli("--help").stdout
