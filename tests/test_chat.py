"""step3_rlhf/chat.py as a user runs it: a subprocess on the tiny preset, offline."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

LINE = re.compile(r"^\[(\d+)\.(\d+)\] (.+?) -> (.+?)(?: \| gold ([+-]\d+\.\d{3}))?$")


def chat(*args, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "step3_rlhf" / "chat.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def parsed(proc) -> list[tuple]:
    """(prompt index, sample index, prompt, response, gold score or None) per output line."""
    out = []
    for line in proc.stdout.splitlines():
        m = LINE.match(line)
        assert m, f"unexpected output line: {line!r}"
        gold = float(m[5]) if m[5] is not None else None
        out.append((int(m[1]), int(m[2]), ast.literal_eval(m[3]), ast.literal_eval(m[4]), gold))
    return out


def test_greedy_two_prompts(tiny_model):
    lines = parsed(chat("--model", "tiny", "--prompt", "This movie", "--prompt", "I expected", "--greedy",
                        "--max_new_tokens", 8, "--gold_scorer", "none"))
    assert [(i, j, p) for i, j, p, _, _ in lines] == [(0, 0, "This movie"), (1, 0, "I expected")]
    assert all(r and g is None for *_, r, g in lines)
    again = parsed(chat("--model", "tiny", "--prompt", "I expected", "--greedy", "--max_new_tokens", 8,
                        "--gold_scorer", "none"))
    assert again[0][3] == lines[1][3]  # greedy: the same response, alone or in a list


def test_sampled_from_files_with_gold_auto(tiny_model, imdb_task, tmp_path):
    from common.gold import GoldScorer
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "This movie"}) + "\n\n" + json.dumps({"prompt": "The acting"}) + "\n")
    text = tmp_path / "prompts.txt"
    text.write_text("I expected\n\n")
    args = ["--model", "tiny", "--prompts_file", jsonl, "--prompt", "What a", "--num_samples", 2,
            "--max_new_tokens", 6, "--temperature", 1.0, "--top_p", 0.9, "--seed", 3, "--gold_scorer", "auto"]
    lines = parsed(chat(*args))
    assert [(i, j, p) for i, j, p, _, _ in lines] == [
        (0, 0, "What a"), (0, 1, "What a"), (1, 0, "This movie"), (1, 1, "This movie"),
        (2, 0, "The acting"), (2, 1, "The acting")]
    gold = GoldScorer.load(imdb_task / "gold_scorer.json")
    expected = gold.logit([p + r for _, _, p, r, _ in lines])
    assert [g for *_, g in lines] == pytest.approx(list(expected), abs=1e-3)  # printed to 3 decimals
    assert parsed(chat(*args)) == lines  # seeded
    from_text = parsed(chat("--model", "tiny", "--prompts_file", text, "--max_new_tokens", 4, "--gold_scorer",
                            imdb_task / "gold_scorer.json"))
    assert [(p, g is not None) for _, _, p, _, g in from_text] == [("I expected", True)]


def test_clear_errors(tmp_path):
    missing = chat("--model", tmp_path / "no_such_run", "--prompt", "hi", expect=2)
    assert "no_such_run: no such folder" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    err = chat("--model", "tiny", "--prompts_file", bad, expect=2)
    assert f"{bad}:2:" in err.stderr and "Traceback" not in err.stderr
    assert "--greedy" in chat("--model", "tiny", "--prompt", "hi", "--greedy", "--num_samples", 2, expect=2).stderr
