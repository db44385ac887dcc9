"""Stage 1 on a Llama-2-style sentencepiece tokenizer (no pad token, BOS added), and LoRA."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, free_port


def run_stage1(args: list, tmp_path) -> subprocess.CompletedProcess:
    """One plain process (no launcher): the strategy sets up a 1-rank gloo group itself."""
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(REPO / "step1_sft" / "main.py"), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def llama_style(imdb_task, tmp_path_factory):
    from common.presets import build_sentencepiece_llama
    from common.tasks.imdb import split_reviews
    train, _ = split_reviews()
    return build_sentencepiece_llama(tmp_path_factory.mktemp("sp") / "llama", [t for t, _ in train[:3000]])


def test_llama_style_tokenizer_is_what_llama2_looks_like(llama_style):
    from transformers import AutoTokenizer

    from common.models import load_tokenizer
    raw = AutoTokenizer.from_pretrained(llama_style)
    assert raw.pad_token is None and raw("a film")["input_ids"][0] == raw.bos_token_id
    cfg = type("C", (), {"model_name_or_path": str(llama_style), "trust_remote_code": False})()
    tok = load_tokenizer(cfg)
    assert tok.pad_token_id == tok.eos_token_id  # densehf pads with EOS; masks decide the rest


@pytest.mark.slow
def test_stage1_on_the_llama_tokenizer_path(llama_style, tmp_path):
    out = tmp_path / "sft"
    run_stage1(["--model_name_or_path", llama_style, "--data_path", "imdb", "--output_dir", out,
                "--data_output_path", tmp_path / "cache", "--max_steps", 12, "--max_seq_len", 64,
                "--per_device_train_batch_size", 8, "--max_eval_samples", 32, "--learning_rate", 3e-3,
                "--zero_stage", 0, "--no-enable_tensorboard"], tmp_path)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.5
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out / "hf_export")
    assert tok("a film")["input_ids"][0] == tok.bos_token_id
    AutoModelForCausalLM.from_pretrained(out / "hf_export")


def test_lora_merge_reproduces_the_adapted_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.lora import merged_state_dict
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    peft_model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # a trained adapter (B starts at zero)
    merged = merged_state_dict(peft_model, peft_model.state_dict())
    assert not any("lora" in k or "base_layer" in k for k in merged)
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(merged)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_stage1_lora_exports_a_merged_plain_model(tiny_model, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "lora"
    run_stage1(["--model_name_or_path", tiny_model, "--data_path", "imdb", "--output_dir", out,
                "--data_output_path", tmp_path / "cache", "--max_steps", 6, "--max_seq_len", 48,
                "--per_device_train_batch_size", 4, "--max_eval_samples", 16, "--learning_rate", 1e-2,
                "--lora_dim", 4, "--zero_stage", 2, "--no-enable_tensorboard"], tmp_path)
    exported = load_file(out / "hf_export" / "model.safetensors")
    base = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert exported.keys() == base.keys()
    changed = [k for k in base if not torch.equal(exported[k], base[k])]
    assert any("q_proj" in k for k in changed), "LoRA updates were not merged"
    assert not any("norm" in k for k in changed)  # only adapted (linear) weights move
