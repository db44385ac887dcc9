"""Loading tokenizers and models by hub name, local folder, preset or stage output."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from common.errors import ConfigError, DensehfError
from common.logger import log

EXPORT_DIR = "hf_export"        # where every stage writes its save_pretrained folder
STAGE_FILE = "densehf_stage.json"  # what produced an export: checked by the next stage


def resolve_model_path(name_or_path: str) -> str:
    """A preset, a stage's output folder (its `hf_export/`), an HF folder, or a hub name."""
    path = Path(name_or_path)
    if (path / EXPORT_DIR / "config.json").is_file():
        return str(path / EXPORT_DIR)
    if (path / "config.json").is_file():
        return str(path)
    if path.is_dir():
        raise DensehfError(f"{path}: no config.json (not a model folder, nor a densehf stage "
                           f"output with {EXPORT_DIR}/)")
    if not path.exists() and _looks_local(name_or_path):
        raise DensehfError(f"{path}: no such folder (and not a hub name like 'org/model' or a preset)")
    from common.presets import resolve_model
    return resolve_model(name_or_path)


def _looks_local(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else that does not exist is a missing folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or ("/" in name and Path(name).parent.is_dir())


def export_kind(path: str) -> Optional[str]:
    """The densehf model kind recorded in an export ('causal_lm', 'reward', ...), if any."""
    f = Path(path) / STAGE_FILE
    return json.loads(f.read_text())["kind"] if f.is_file() else None


def check_kind(path: str, allowed: tuple[str, ...], flag: str) -> None:
    kind = export_kind(path)
    if kind is not None and kind not in allowed:
        raise DensehfError(f"{flag} {path}: this is a '{kind}' export, expected {' or '.join(allowed)}")


def write_kind(out_dir: Path, kind: str, **extra) -> None:
    (Path(out_dir) / STAGE_FILE).write_text(json.dumps({"kind": kind, **extra}, indent=1))


def load_tokenizer(cfg, path: Optional[str] = None):
    """The tokenizer, with a pad token guaranteed (EOS when it has none, as for Llama).

    Padding is always decided by attention masks, never by comparing ids to pad_token_id,
    so pad == eos is safe everywhere in densehf (a reward model still reads its score at
    the last real token, the EOS, not at the padding after it).
    """
    from transformers import AutoTokenizer
    path = resolve_model_path(path or getattr(cfg, "tokenizer_name_or_path", None) or cfg.model_name_or_path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tok.eos_token_id is None:
        raise DensehfError(f"{path}: tokenizer has no EOS token; densehf needs one to end responses")
    if getattr(cfg, "chat_template", ""):
        tok.chat_template = read_chat_template(cfg.chat_template)
    if tok.pad_token_id is None:
        log.info("%s: tokenizer has no pad token; padding with EOS %r (attention masks mark padding)",
                 path, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def read_chat_template(path: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"--chat_template {path}: no such file (give a file holding a Jinja chat template)")
    return Path(path).read_text(encoding="utf-8")


def load_model(cfg, strategy, model_class, path: Optional[str] = None, zero_stage: Optional[int] = None,
               train: bool = True, **config_overrides) -> torch.nn.Module:
    """`model_class.from_pretrained` under the strategy's ZeRO-3 init, with GC and LoRA if asked."""
    from common.lora import apply_lora
    from transformers import AutoConfig
    flag = "--model_name_or_path" if path is None else "model"
    path = resolve_model_path(path or cfg.model_name_or_path)
    if model_class.__name__ == "AutoModelForCausalLM":  # stage 1 and the RL policy: no reward head
        check_kind(path, ("causal_lm",), flag)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    for key, value in config_overrides.items():  # e.g. num_labels, a bias-free token head
        setattr(config, key, value)
    with strategy.model_init(zero_stage, train=train):
        model = model_class.from_pretrained(
            path, config=config, dtype=strategy.torch_dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code)
    if train and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if train and cfg.lora_dim > 0:
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = apply_lora(model, cfg.lora_dim, cfg.lora_module_name, cfg.lora_alpha)
    return model
