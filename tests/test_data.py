"""Loaders on small local files; malformed rows name their place; encoding and batching."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data.batches import ResumableBatches, eval_shard, pad
from common.data.encode import IGNORE, encode_pair, encode_sft, join
from common.data.loaders import load_split_rows, parse_hub_row, read_file
from common.data.prepare import stage_share
from common.data.schemas import PAIR, PROMPT, SFT
from common.errors import ConfigError, DataError

PAIRS = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_local_format_loads(tmp_path, suffix):
    import datasets
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, PAIRS)
    elif suffix == ".json":
        path.write_text(json.dumps(PAIRS))
    else:
        ds = datasets.Dataset.from_list(PAIRS)
        ds.to_parquet(str(path)) if suffix == ".parquet" else ds.to_csv(str(path), index=False)
    assert read_file(path, PAIR) == PAIRS


def test_folder_with_train_and_eval(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PAIRS[:15])
    write_jsonl(tmp_path / "eval.jsonl", PAIRS[15:])
    train, evaluation = load_split_rows(str(tmp_path), PAIR, 0.1, 0)
    assert (train, evaluation) == (PAIRS[:15], PAIRS[15:])


def test_single_file_holds_out_eval_deterministically(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    train, evaluation = load_split_rows(str(path), PAIR, 0.25, seed=1)
    assert len(evaluation) == 5 and len(train) == 15
    assert sorted(map(str, train + evaluation)) == sorted(map(str, PAIRS))
    assert load_split_rows(str(path), PAIR, 0.25, seed=1) == (train, evaluation)


@pytest.mark.parametrize("line, where, message", [
    ('{"prompt": "a", "chosen": "b"', "p.jsonl:2", "malformed JSON"),
    ('{"prompt": "a", "chosen": "b"}', "p.jsonl:2: field 'rejected'", "missing"),
    ('{"prompt": "a", "chosen": "b", "rejeted": "c"}', "p.jsonl:2: field 'rejected'", "misspelled"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "p.jsonl:2: field 'chosen'", "expected a string"),
    ('{"prompt": "a", "chosen": "  ", "rejected": "c"}', "p.jsonl:2: field 'chosen'", "is empty"),
    ('["a", "b", "c"]', "p.jsonl:2", "expected a JSON object"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, line, where, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        read_file(path, PAIR)
    assert where in str(err.value) and message in str(err.value)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(json.dumps(PAIRS[0]).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: not UTF-8"):
        read_file(path, PAIR)


def test_hub_parsers_offline():
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: a pun",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: no"}
    row = parse_hub_row("Anthropic/hh-rlhf", hh, PAIR)
    assert row == {"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant:",
                   "chosen": " a pun", "rejected": " no"}
    dahoas = {"prompt": "\n\nHuman: x\n\nAssistant:", "response": " r", "chosen": " c", "rejected": " j"}
    assert parse_hub_row("Dahoas/rm-static", dahoas, SFT) == {"prompt": dahoas["prompt"], "response": " r"}
    assert parse_hub_row("Dahoas/full-hh-rlhf", dahoas, PAIR)["rejected"] == " j"


HH_ROWS = [
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: a pun",
     "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: no"},
    {"chosen": "\n\nHuman: a film?\n\nAssistant: this one", "rejected": "\n\nHuman: a film?\n\nAssistant: none"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("schema", [PAIR, SFT, PROMPT], ids=lambda s: s.name)
def test_a_local_copy_of_hh_rlhf_gives_the_hub_parsers_rows(tmp_path, suffix, schema):
    import datasets
    path = tmp_path / f"hh{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in HH_ROWS))
    elif suffix == ".json":
        path.write_text(json.dumps(HH_ROWS))
    else:
        datasets.Dataset.from_list(HH_ROWS).to_parquet(str(path))
    assert read_file(path, schema) == [parse_hub_row("Anthropic/hh-rlhf", r, schema) for r in HH_ROWS]


def test_a_damaged_hh_row_is_named_with_its_line(tmp_path):
    from common.data.loaders import source_shape
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(HH_ROWS[0]) + "\n" + json.dumps({"chosen": "no turns", "rejected": "x"}) + "\n")
    assert source_shape(str(path)) == "Anthropic/hh-rlhf dialogues (chosen, rejected)"
    with pytest.raises(DataError, match=r"hh.jsonl:2: not a row of Anthropic/hh-rlhf dialogues .*: ValueError no "):
        read_file(path, PAIR)


def test_unknown_name_without_network_is_a_clear_error():
    with pytest.raises(DataError, match="no-such/dataset: not a local file"):
        load_split_rows("no-such/dataset", PAIR, 0.1, 0)


def test_data_split_partitions_disjointly_and_errors_on_empty_share():
    rows = list(range(100))
    parts = [stage_share(rows, "2,4,4", s, 0, "x") for s in (1, 2, 3)]
    assert [len(p) for p in parts] == [20, 40, 40]
    assert sorted(sum(parts, [])) == rows
    with pytest.raises(DataError, match="leaves stage 2 no rows"):
        stage_share(rows, "10,0,0", 2, 0, "x")
    with pytest.raises(ConfigError, match="--data_split"):
        stage_share(rows, "1,2", 1, 0, "x")


class Tok:
    """A minimal character tokenizer (enough for the encoding rules)."""
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [10 + ord(c) % 50 for c in text]}


def test_sft_encoding_masks_the_prompt_and_ends_with_eos():
    ex = encode_sft(Tok(), {"prompt": "ab", "response": "cde"}, 64, "raw", "truncate")
    assert ex["input_ids"][0] == 1 and ex["input_ids"][-1] == 2 and len(ex["input_ids"]) == 7
    assert ex["labels"][:3] == [IGNORE] * 3 and ex["labels"][3:] == ex["input_ids"][3:]


def test_too_long_rows_truncate_or_skip():
    prompt, response = list(range(30)), list(range(100, 130))
    assert join(prompt, response, 20, "skip") is None
    ex = join(prompt, response, 20, "truncate")
    assert len(ex["input_ids"]) == 20 and ex["input_ids"][:10] == prompt[-10:]
    pair = encode_pair(Tok(), {"prompt": "ab", "chosen": "c", "rejected": "de"}, 64, "raw", "truncate")
    assert pair["chosen_ids"][:3] == pair["rejected_ids"][:3] and pair["prompt_len"] == 3


def test_pretokenised_texts_encode_as_the_tokenizer_does(tiny_model):
    """A cache build tokenises every text in one batched call: the rows must come out the same,
    the long ones (encoded a second time to truncate) and texts it was not given included."""
    from transformers import AutoTokenizer
    from common.data.encode import Pretokenised
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"prompt": "A film about", "response": " a dog. " * 40}, {"prompt": "", "response": "Great!"},
            {"prompt": "Loved it", "chosen": " so much", "rejected": " not at all " * 30}]
    fast = Pretokenised(tok, [v for row in rows for v in row.values() if isinstance(v, str)])
    assert len(fast.known) == 7 and fast.eos_token_id == tok.eos_token_id and len(fast) == len(tok)
    for too_long in ("skip", "truncate"):
        for row in rows[:2]:
            assert encode_sft(fast, row, 32, "raw", too_long) == encode_sft(tok, row, 32, "raw", too_long)
            assert encode_sft(fast, row, 64, "chat", too_long) == encode_sft(tok, row, 64, "chat", too_long)
        assert encode_pair(fast, rows[2], 48, "raw", too_long) == encode_pair(tok, rows[2], 48, "raw", too_long)
    ids = fast("Great!", add_special_tokens=False)["input_ids"]
    ids.append(0)  # the caller owns what it gets: the stored ids are not changed
    assert fast("Great!", add_special_tokens=False)["input_ids"] == tok("Great!", add_special_tokens=False)["input_ids"]


def test_resumable_batches_cover_each_row_once_and_resume_exactly():
    world = [ResumableBatches(50, 4, r, 2, seed=3) for r in range(2)]
    full = [list(w.epoch(0)) for w in world]
    seen = sum((b for batches in full for b in batches), [])
    assert len(seen) == len(set(seen)) == 48  # 6 global batches of 8, the remainder dropped
    assert list(world[0].epoch(0, start=4)) == full[0][4:]
    assert list(world[0].epoch(1)) != full[0]


def test_eval_shard_equal_counts_and_each_row_once():
    shards = [eval_shard(7, r, 2) for r in range(2)]
    assert len(shards[0][0]) == len(shards[1][0]) == 4
    counted = [i for idx, w in shards for i, wt in zip(idx, w) if wt]
    assert sorted(counted) == list(range(7))


def test_pad_left_and_right():
    ids, mask = pad([[5, 6, 7], [8]], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]


def test_prompt_formats_use_the_chat_template_when_there_is_one():
    from common.data.encode import render_prompt

    class Plain:
        chat_template = None

    class Chat:
        chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"
    assert render_prompt(Plain(), "Hi", "raw") == "Hi"
    assert render_prompt(Plain(), "Hi", "chat") == "\n\nHuman: Hi\n\nAssistant:"
    assert render_prompt(Chat(), "Hi", "chat") == "<|user|>Hi<|assistant|>"
    assert render_prompt(Chat(), "", "chat") == ""  # plain-text SFT rows stay plain


# ---- --validate_only ------------------------------------------------------------------
BAD_INPUTS = Path(__file__).parent / "bad_inputs"


def validate_args(cache, *extra) -> list:
    return ["--data_path", str(BAD_INPUTS / "too_long.jsonl"), "--data_output_path", str(cache),
            "--eval_ratio", "0", "--max_seq_len", "16", "--per_device_train_batch_size", "2", *extra]


def test_validate_only_reports_and_leaves_a_cache_training_reuses(tiny_model, tmp_path):
    from types import SimpleNamespace
    from common.config import SupervisedConfig, parse_config
    from common.data.prepare import prepare_tokenized
    from common.errors import ValidationDone
    from common.models import load_tokenizer
    solo = SimpleNamespace(is_main=True, rank=0, world_size=1, wait_for_main=lambda: None)
    tok = load_tokenizer(SimpleNamespace(trust_remote_code=False), tiny_model)
    cfg = parse_config(SupervisedConfig, validate_args(tmp_path, "--validate_only"))
    with pytest.raises(ValidationDone) as done:
        prepare_tokenized(cfg, SFT, tok, encode_sft, stage=1, strategy=solo)
    report = done.value.report
    assert "train: 5 rows, 5 examples kept, 3 truncated to 16 tokens, 0 duplicates, skipped: none" in report
    assert "train tokens per example: min " in report and "max 16" in report
    assert "plan: 2 optimizer steps of 2 rows x 1 processes x 1 accumulation" in report
    assert ": read as standard columns" in report
    built = sorted(tmp_path.iterdir())
    _, _, stats = prepare_tokenized(parse_config(SupervisedConfig, validate_args(tmp_path)), SFT, tok,
                                    encode_sft, stage=1, strategy=solo)
    assert stats == done.value.stats and sorted(tmp_path.iterdir()) == built


def test_two_jobs_asking_for_one_cache_wait_for_its_builder_instead_of_replacing_it(tiny_model, tmp_path,
                                                                                     monkeypatch):
    """An experiment's parallel runs start together: the second must read the first's build, not
    replace it while the first is loading it (which failed with 'Directory .../train not found')."""
    import shutil
    import threading
    from types import SimpleNamespace
    from common.config import SupervisedConfig, parse_config
    from common.data import prepare
    from common.models import load_tokenizer
    from common.presets import lock_for
    solo = SimpleNamespace(is_main=True, rank=0, world_size=1, wait_for_main=lambda: None)
    tok = load_tokenizer(SimpleNamespace(trust_remote_code=False), tiny_model)
    cfg = parse_config(SupervisedConfig, validate_args(tmp_path))
    builds, build = [], prepare._build
    monkeypatch.setattr(prepare, "_build", lambda *args: (builds.append(args[5]), build(*args)))
    built = prepare.prepare_tokenized(cfg, SFT, tok, encode_sft, stage=1, strategy=solo)[2]
    folder = builds[0]
    shutil.move(folder, tmp_path / "elsewhere")
    with lock_for(folder):  # another job is building it
        got = {}
        job = threading.Thread(target=lambda: got.update(
            stats=prepare.prepare_tokenized(cfg, SFT, tok, encode_sft, stage=1, strategy=solo)[2]))
        job.start()
        job.join(2.0)
        assert job.is_alive()  # waiting for the lock
        shutil.move(tmp_path / "elsewhere", folder)  # the other job's build lands
    job.join(60)
    assert got["stats"] == built and builds == [folder]  # read, not built again


def test_run_main_exits_0_after_validation_and_2_on_errors(capsys):
    from common.cli import run_main
    from common.errors import ValidationDone

    def validated():
        raise ValidationDone("data OK (report)", {})

    def bad_rows():
        read_file(BAD_INPUTS / "malformed_json.jsonl", SFT)
    run_main(validated)  # returns: exit status 0
    assert "data OK (report)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as code:
        run_main(bad_rows)
    err = capsys.readouterr().err
    assert code.value.code == 2 and "malformed_json.jsonl:2" in err and "malformed_json.jsonl:4" in err


@pytest.mark.slow
def test_validate_only_through_the_launcher(tiny_model, tmp_path):
    from conftest import launch
    out = tmp_path / "run"
    proc = launch("step1_sft/main.py", ["--model_name_or_path", tiny_model, "--output_dir", out,
                                        *validate_args(tmp_path / "cache", "--validate_only")])
    assert proc.stdout.count("data check: stage 1") == 1  # rank 0 only
    assert "3 truncated to 16 tokens" in proc.stdout
    assert "plan: 1 optimizer steps of 2 rows x 2 processes" in proc.stdout
    assert not (out / "hf_export").exists() and not (out / "metrics.jsonl").exists()
