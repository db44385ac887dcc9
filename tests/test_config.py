"""One config system: YAML and flags agree; bad values are errors that name the place."""
from __future__ import annotations

import subprocess
import sys

import pytest

from common.config import dump_config, parse_config
from common.errors import ConfigError
from tests.conftest import REPO
from step1_sft.main import SFTConfig


def test_yaml_and_flags_give_the_same_config(tmp_path):
    flags = ["--zero_stage", "3", "--learning_rate", "2e-5", "--data_path", "a.jsonl", "b.jsonl",
             "--gradient_checkpointing", "--lr_scheduler_type", "linear", "--max_steps", "7"]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("zero_stage: 3\nlearning_rate: 2.0e-5\ndata_path: [a.jsonl, b.jsonl]\n"
                         "gradient_checkpointing: true\nlr_scheduler_type: linear\nmax_steps: 7\n")
    assert parse_config(SFTConfig, flags) == parse_config(SFTConfig, ["--config", str(yaml_file)])


def test_flags_override_yaml_and_dump_round_trips(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("zero_stage: 3\nseed: 5\n")
    cfg = parse_config(SFTConfig, ["--config", str(yaml_file), "--zero_stage", "1"])
    assert (cfg.zero_stage, cfg.seed) == (1, 5)
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert parse_config(SFTConfig, ["--config", str(tmp_path / "resolved.yaml")]) == cfg


def test_deepspeed_chat_flag_names_are_accepted():
    cfg = parse_config(SFTConfig, [
        "--model_name_or_path", "m", "--data_path", "d", "--data_split", "2,4,4", "--data_output_path", "o",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "3", "--max_seq_len", "9",
        "--learning_rate", "1e-5", "--weight_decay", "0.1", "--num_train_epochs", "2",
        "--gradient_accumulation_steps", "4", "--lr_scheduler_type", "cosine", "--num_warmup_steps", "1",
        "--seed", "3", "--zero_stage", "2", "--offload", "--dtype", "bf16", "--gradient_checkpointing",
        "--lora_dim", "8", "--lora_module_name", "q_proj,v_proj", "--output_dir", "x",
        "--enable_tensorboard", "--tensorboard_path", "tb", "--max_steps", "5", "--save_steps", "2",
        "--eval_steps", "2", "--resume", "--local_rank=0"])
    assert cfg.offload and cfg.lora_dim == 8 and cfg.dtype == "bf16" and cfg.gradient_accumulation_steps == 4


@pytest.mark.parametrize("text, message", [
    ("zero_stage: 5\n", "key 'zero_stage': 5 is not one of"),
    ("learning_rate: fast\n", "key 'learning_rate': expected float"),
    ("gradient_checkpointing: 3\n", "key 'gradient_checkpointing': expected true or false"),
    ("learnig_rate: 0.1\n", "unknown key 'learnig_rate'"),
    ("zero_stage: [\n", "not valid YAML"),
])
def test_bad_yaml_values_name_the_key(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml") as err:
        parse_config(SFTConfig, ["--config", str(f)])
    assert message in str(err.value)


def test_bad_flag_value_is_a_clear_error():
    proc = subprocess.run([sys.executable, str(REPO / "step1_sft" / "main.py"), "--zero_stage", "7"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "--zero_stage: invalid choice: 7" in proc.stderr


@pytest.mark.parametrize("stage, flags", [
    ("step1_sft", ("--model_name_or_path", "--data_split", "--zero_stage", "--resume", "--config")),
    ("step2_reward", ("--model_type", "--model_name_or_path", "--zero_stage", "--lora_dim")),
    ("step3_rlhf", ("--algo", "--reward_calculator", "--abc_beta", "--reward_dropout_rate", "--actor_zero_stage",
                    "--offload_reference_model", "--kl_ctl", "--enable_hybrid_engine")),
])
def test_help_explains_every_flag(stage, flags):
    proc = subprocess.run([sys.executable, str(REPO / stage / "main.py"), "--help"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in flags:
        assert flag in proc.stdout
    assert "(default: " in proc.stdout  # defaults are shown


@pytest.mark.parametrize("cuda,offload,expected", [
    (False, False, {"torch_adam": True}),                   # CPU: torch AdamW, no JIT build
    (True, False, {"torch_adam": True, "fused": True}),     # GPU: torch's fused AdamW, no nvcc at first use
    (True, True, {}),                                       # offload: DeepSpeed's CPUAdam on the host states
    (False, True, {})])
def test_optimizer_kind_needs_no_compiler_except_for_offload(monkeypatch, cuda, offload, expected):
    import torch

    from common.strategy import DeepSpeedStrategy
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    params = DeepSpeedStrategy(parse_config(SFTConfig, [])).ds_config(offload=offload)["optimizer"]["params"]
    assert {k: params[k] for k in ("torch_adam", "fused") if k in params} == expected
