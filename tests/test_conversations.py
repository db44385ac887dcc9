"""Conversational rows (TRL's message lists) and UltraFeedback-binarized copies: read, checked,
rendered with a chat template (ChatML given to the tiny tokenizer), and trained on by each stage."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.config import RLHFConfig, SupervisedConfig, parse_config
from common.data.encode import IGNORE, encode_pair, encode_sft
from common.data.loaders import read_file, source_shape
from common.data.prepare import prepare_tokenized
from common.data.schemas import PAIR, PROMPT, SFT
from common.errors import ConfigError, ValidationDone
from common.models import load_tokenizer
from step3_rlhf.models import encode_prompt

CHATML = Path(__file__).parent / "data" / "chatml.jinja"


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


TWO_TURNS = [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello there"), user("A film?"),
             bot("This one")]
FILMS = ["a quiet drama", "a loud comedy", "an old western", "a space opera"]
SHAPES = {  # name: (schema, rows)
    "sft_messages": (SFT, [{"messages": [user(f"Tell me of {f}."), bot(f"It is {f}."), user("More?"), bot("No.")]}
                           for f in FILMS]),
    "sft_prompt_completion": (SFT, [{"prompt": [user(f)], "completion": [bot(f"I liked {f}.")]} for f in FILMS]),
    "pair_explicit": (PAIR, [{"prompt": [user(f)], "chosen": [bot("good")], "rejected": [bot("bad")]} for f in FILMS]),
    "pair_implicit": (PAIR, [{"chosen": [user(f), bot("good")], "rejected": [user(f), bot("bad")]} for f in FILMS]),
    "prompt_messages": (PROMPT, [{"prompt": [{"role": "system", "content": "Be kind."}, user(f)]} for f in FILMS]),
}
# a local copy of HuggingFaceH4/ultrafeedback_binarized (its columns; the prompt also as text)
UF_ROWS = [{"prompt": f, "prompt_id": str(i), "chosen": [user(f), bot("good")], "rejected": [user(f), bot("bad")],
            "messages": [user(f), bot("good")], "score_chosen": 8.0, "score_rejected": 3.5} for i, f in enumerate(FILMS)]


def write(path: Path, rows: list) -> Path:
    if path.suffix == ".parquet":
        import datasets
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_tok(tiny_model):
    return load_tokenizer(SimpleNamespace(trust_remote_code=False, chat_template=str(CHATML)), tiny_model)


def test_multi_turn_sft_trains_on_the_assistant_turns_only(chat_tok):
    ex = encode_sft(chat_tok, {"messages": TWO_TURNS}, 512, "raw", "skip")
    ids, labels = ex["input_ids"], ex["labels"]
    # the ids are the tokens of the whole render (BOS, then EOS after ChatML's last end of turn)
    whole = chat_tok.apply_chat_template(TWO_TURNS, tokenize=False)
    body = chat_tok(whole, add_special_tokens=False)["input_ids"]
    assert ids == [chat_tok.bos_token_id] + body + [chat_tok.eos_token_id]
    assert all(label in (IGNORE, token) for token, label in zip(ids, labels))
    trained = [label != IGNORE for label in labels]
    runs, start = [], 0  # maximal runs of trained / untrained tokens, decoded
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            runs.append((trained[start], chat_tok.decode(ids[start:i])))
            start = i
    assert runs == [
        (False, "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Hello there<|im_end|>\n"),
        (False, "<|im_start|>user\nA film?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "This one<|im_end|>\n</s>")]
    assert ex["prompt_len"] == trained.index(True)


def test_preferences_and_rl_prompts_render_with_the_generation_prompt(chat_tok):
    prompt = TWO_TURNS[:4]
    row = {"prompt": prompt, "chosen": [bot("Yes")], "rejected": [bot("No")]}
    pair = encode_pair(chat_tok, row, 512, "raw", "skip")
    tail = lambda ids: chat_tok.decode(ids[pair["prompt_len"]:])  # noqa: E731
    head = chat_tok.decode(pair["chosen_ids"][:pair["prompt_len"]])
    assert head.endswith("A film?<|im_end|>\n<|im_start|>assistant\n")
    assert (tail(pair["chosen_ids"]), tail(pair["rejected_ids"])) == ("Yes<|im_end|>\n</s>", "No<|im_end|>\n</s>")
    rl = encode_prompt(chat_tok, {"prompt": prompt}, 512, "raw", "skip")
    assert rl["prompt"].endswith("<|im_start|>user\nA film?<|im_end|>\n<|im_start|>assistant\n")
    assert chat_tok.decode(rl["input_ids"]) == "<s>" + rl["prompt"]


def test_a_tokenizer_without_a_chat_template_names_the_flag(tiny_model):
    plain = load_tokenizer(SimpleNamespace(trust_remote_code=False), tiny_model)
    with pytest.raises(ConfigError, match="no chat template: give --chat_template FILE"):
        encode_sft(plain, {"messages": TWO_TURNS}, 512, "raw", "skip")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_local_copy_of_ultrafeedback_binarized(tmp_path, suffix):
    path = write(tmp_path / f"uf{suffix}", UF_ROWS)
    assert source_shape(str(path)).startswith("HuggingFaceH4/ultrafeedback_binarized")
    pair = {"prompt": [user(FILMS[1])], "chosen": [bot("good")], "rejected": [bot("bad")]}
    assert read_file(path, PAIR)[1] == pair
    assert read_file(path, SFT)[0] == {"messages": [user(FILMS[0]), bot("good")]}
    assert read_file(path, PROMPT)[2] == {"prompt": [user(FILMS[2])]}


def validate(schema, data: Path, cache: Path, *flags) -> ValidationDone:
    """--validate_only of `schema`'s stage on `data`, in-process with the tiny tokenizer."""
    stage = {"sft": 1, "pair": 2, "prompt": 3}[schema.name]
    batch = ["--per_device_generation_batch_size", "2"] if stage == 3 else ["--per_device_train_batch_size", "2"]
    cfg = parse_config(RLHFConfig if stage == 3 else SupervisedConfig, [
        "--data_path", str(data), "--data_output_path", str(cache), "--eval_ratio", "0", "--validate_only",
        *batch, *map(str, flags)])
    solo = SimpleNamespace(is_main=True, rank=0, world_size=1, wait_for_main=lambda: None)
    tok = load_tokenizer(SimpleNamespace(trust_remote_code=False, chat_template=cfg.chat_template), "tiny")
    encode = {"sft": encode_sft, "pair": encode_pair, "prompt": encode_prompt}[schema.name]
    with pytest.raises(ValidationDone) as done:
        prepare_tokenized(cfg, schema, tok, encode, stage, solo, max_len=512)
    return done.value


@pytest.mark.parametrize("name", list(SHAPES) + ["ultrafeedback"])
def test_each_shape_through_validate_only(name, tiny_model, tmp_path):
    schema, rows = SHAPES.get(name, (PAIR, UF_ROWS))
    data = write(tmp_path / "data.jsonl", rows)
    done = validate(schema, data, tmp_path / "cache", "--chat_template", CHATML)
    shape = "HuggingFaceH4/ultrafeedback_binarized" if name == "ultrafeedback" else "conversational (message"
    assert f"{data}: read as {shape}" in done.report
    assert "train: 4 rows, 4 examples kept, 0 truncated" in done.report, done.report


def test_mapped_columns_hold_conversations(tiny_model, tmp_path):
    rows = [{"query": [user(f)], "good": [bot("yes")], "bad": [bot("no")]} for f in FILMS]
    done = validate(PAIR, write(tmp_path / "d.jsonl", rows), tmp_path / "cache", "--chat_template", CHATML,
                    "--prompt_key", "query", "--chosen_key", "good", "--rejected_key", "bad")
    assert "read as conversational" in done.report and "4 examples kept" in done.report


def run_stage(script: str, args: list) -> None:
    """A stage as one plain process (a 1-rank gloo group): the group it leaves ends with it."""
    import os
    import subprocess
    import sys
    from tests.conftest import REPO, free_port
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "MASTER_PORT": str(free_port())}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_conversations_train_through_the_three_stages(tiny_model, tmp_path):
    """Stage 1 on multi-turn messages, stage 2 on conversational pairs, stage 3 on conversational
    prompts; the template given to stage 1 travels with its export, so stage 3 needs no flag."""
    from tests.conftest import read_metrics
    common = ["--data_output_path", tmp_path / "cache", "--eval_ratio", "0", "--max_steps", "2",
              "--save_steps", "0", "--no-enable_tensorboard"]
    trainer = ["--zero_stage", "0", "--per_device_train_batch_size", "2", "--max_seq_len", "256"]
    data = {name: write(tmp_path / f"{name}.jsonl", SHAPES[name][1]) for name in SHAPES}
    run_stage("step1_sft/main.py", ["--model_name_or_path", tiny_model, "--data_path", data["sft_messages"],
                                    "--output_dir", tmp_path / "sft", "--chat_template", CHATML, *trainer, *common])
    run_stage("step2_reward/main.py", ["--model_name_or_path", tiny_model, "--data_path", data["pair_explicit"],
                                       "--output_dir", tmp_path / "rm", "--chat_template", CHATML, *trainer, *common])
    run_stage("step3_rlhf/main.py", [
        "--actor_model_name_or_path", tmp_path / "sft" / "hf_export", "--reward_model_name_or_path",
        tmp_path / "rm" / "hf_export", "--data_path", data["prompt_messages"], "--output_dir", tmp_path / "rl",
        "--actor_zero_stage", "0", "--reference_zero_stage", "0", "--reward_zero_stage", "0",
        "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2",
        "--max_prompt_seq_len", "64", "--max_answer_seq_len", "4", "--eval_steps", "0", "--max_eval_samples", "2",
        *common])
    for run in ("sft", "rm", "rl"):
        assert len(read_metrics(tmp_path / run, "train")) == 2, run
    assert load_tokenizer(SimpleNamespace(trust_remote_code=False), tmp_path / "rl" / "hf_export").chat_template \
        == CHATML.read_text()


def test_a_hub_name_in_datasets_offline_cache(tmp_path, monkeypatch):
    """HF_DATASETS_OFFLINE=1 (set by conftest): a hub name is read from `datasets`' cache. The cache is
    laid out as a download leaves it (<namespace>___<name>/default/<version>/<hash>/<name>-<split>.arrow),
    with UltraFeedback-binarized's train_prefs/test_prefs splits."""
    import datasets
    from common.data.loaders import load_split_rows
    files = {s: str(write(tmp_path / f"{s}.jsonl", UF_ROWS)) for s in ("train_prefs", "test_prefs")}
    datasets.load_dataset("json", data_files=files, cache_dir=str(tmp_path / "built"))
    built = next((tmp_path / "built" / "json").glob("default-*/*/*/dataset_info.json")).parent
    target = tmp_path / "hub" / "HuggingFaceH4___ultrafeedback_binarized" / "default" / "0.0.0" / built.name
    target.mkdir(parents=True)
    for f in built.iterdir():
        f.rename(target / f.name.replace("json-", "ultrafeedback_binarized-"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hub")
    train, evaluation = load_split_rows("HuggingFaceH4/ultrafeedback_binarized", PAIR, 0.5, 0)
    assert train == evaluation == read_file(files["train_prefs"], PAIR)  # both splits, not a held-out half
