"""Every case of tests/bad_inputs/cases.yaml: a clear error naming file, line and field
(or a documented, counted outcome), reached in-process before any model loads."""
from __future__ import annotations

import importlib
from contextlib import nullcontext
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from common.config import RLHFConfig, SupervisedConfig, parse_config
from common.data.encode import encode_pair, encode_sft
from common.data.prepare import prepare_tokenized
from common.data.schemas import SCHEMAS
from common.errors import DensehfError, ValidationDone
from common.models import check_kind, load_model, load_tokenizer, write_kind

HERE = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((HERE / "cases.yaml").read_text())
STAGE_MAIN = {1: "step1_sft.main", 2: "step2_reward.main", 3: "step3_rlhf.main"}


def encoder(schema: str):
    from common.token_labels import encode_revision
    from step3_rlhf.models import encode_prompt
    return {"sft": encode_sft, "pair": encode_pair, "revision": encode_revision, "prompt": encode_prompt}[schema]


def config(stage: int, argv: list):
    return parse_config(RLHFConfig if stage == 3 else SupervisedConfig, [str(a) for a in argv])


def run_data(case: dict, tiny_model: str, tmp_path: Path) -> dict:
    stage = case.get("stage", 1)
    cfg = config(stage, ["--data_path", HERE / case["file"], "--data_output_path", tmp_path,
                         "--eval_ratio", 0, *case.get("flags", [])])
    solo = SimpleNamespace(is_main=True, rank=0, world_size=case.get("world", 1), wait_for_main=lambda: None)
    tokenizer = load_tokenizer(SimpleNamespace(trust_remote_code=False), tiny_model)
    max_len = cfg.max_prompt_seq_len if stage == 3 else cfg.max_seq_len
    try:
        return prepare_tokenized(cfg, SCHEMAS[case["schema"]], tokenizer, encoder(case["schema"]), stage,
                                 solo, max_len=max_len)[2]
    except ValidationDone as done:
        return done.stats


def char_bpe(folder: Path) -> None:
    """A tokenizer unlike the tiny model's byte-level BPE (characters, merges across spaces)."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast
    specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.BPEDecoder()
    tok.train_from_iterator(["a good film", "a bad film", "the plot was thin"] * 20, trainers.BpeTrainer(
        vocab_size=60, special_tokens=list(specials.values()), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(folder)


def build_model(spec: dict, tiny_model: str, folder: Path) -> Path:
    shutil.copytree(tiny_model, folder)
    if spec.get("tokenizer") == "no_pad":
        tok = load_tokenizer(SimpleNamespace(trust_remote_code=False), tiny_model)
        tok.pad_token = None
        tok.save_pretrained(folder)
    elif spec.get("tokenizer") == "char_bpe":
        for f in folder.glob("tokenizer*"):
            f.unlink()
        char_bpe(folder)
    if "kind" in spec:
        write_kind(folder, spec["kind"])
    return folder


def check_model(case: dict, path: Path, tiny_model: str, caplog) -> None:
    cfg = SimpleNamespace(trust_remote_code=False, model_name_or_path=str(path))
    if case["load"] == "causal_lm":  # the kind check comes before any weight is read
        from transformers import AutoModelForCausalLM
        load_model(cfg, None, AutoModelForCausalLM)
    elif case["load"] == "tokenizer":
        with caplog.at_level(logging.INFO, logger="densehf"):
            tok = load_tokenizer(cfg)
        assert tok.pad_token_id == tok.eos_token_id and "no pad token" in caplog.text
        assert_reward_reads_last_real_token(path, tok)
    else:  # "reward": another tokenizer than the policy's is accepted
        from common.tokenmap import same_tokenizer
        check_kind(str(path), ("reward",), "--reward_model_name_or_path")
        scorer_tok = load_tokenizer(cfg)
        policy_tok = load_tokenizer(SimpleNamespace(trust_remote_code=False), tiny_model)
        assert not same_tokenizer(scorer_tok, policy_tok) and scorer_tok.pad_token_id is not None


def assert_reward_reads_last_real_token(path: Path, tok) -> None:
    """Right padding with pad == EOS: each row's score is the one it gets alone."""
    from transformers import AutoModelForSequenceClassification
    from common.data.batches import pad
    from common.heads import sequence_scores
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, pad_token_id=tok.pad_token_id)
    seqs = [tok("a good film")["input_ids"] + [tok.eos_token_id],
            tok("the plot was thin and the acting was worse")["input_ids"] + [tok.eos_token_id]]
    ids, mask = pad(seqs, tok.pad_token_id)
    assert (ids[0, len(seqs[0]):] == tok.eos_token_id).all()  # padding looks like EOS
    with torch.no_grad():
        batched = sequence_scores(model, ids, mask)
        alone = [sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs]
    torch.testing.assert_close(batched, torch.cat(alone))


def assert_subset(expected: dict, actual: dict) -> None:
    for key, value in expected.items():
        if isinstance(value, dict) and value:
            assert_subset(value, actual[key])
        else:
            assert actual[key] == value, (key, actual)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input(case, tiny_model, tmp_path, caplog):
    flags = case.get("flags", [])
    if "model" in case:
        path = build_model(case["model"], tiny_model, tmp_path / "model")
        flags = [str(path) if f == "{model}" else f for f in flags]
    expect = case["expect"]
    with pytest.raises(DensehfError) if "error" in expect else nullcontext() as err:
        if case["check"] == "data":
            stats = run_data(case, tiny_model, tmp_path / "cache")
        elif case["check"] == "config":
            config(case["stage"], ["--config", HERE / case["file"], *flags])
        elif case["check"] == "main":
            importlib.import_module(STAGE_MAIN[case["stage"]]).main([str(f) for f in flags])
        else:
            check_model(case, path, tiny_model, caplog)
    if "error" in expect:
        for part in expect["error"]:
            assert part in str(err.value), f"{part!r} not in:\n{err.value}"
    if "stats" in expect:
        assert_subset(expect["stats"], stats)


def test_every_corpus_file_has_a_case():
    used = {c["file"] for c in CASES if "file" in c}
    assert used == {p.name for p in HERE.iterdir()} - {"cases.yaml"}
