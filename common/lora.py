"""LoRA through PEFT, and merging it back into plain weights for the HF export."""
from __future__ import annotations

import torch


def apply_lora(model: torch.nn.Module, rank: int, modules: str, alpha: float) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters of `rank` (0: return it unchanged)."""
    if rank <= 0:
        return model
    from peft import LoraConfig, get_peft_model
    targets = "all-linear" if modules == "all-linear" else [m.strip() for m in modules.split(",")]
    # Heads added by densehf (score, token head, value head) train fully.
    keep = [n for n in ("score", "token_head", "value_head") if hasattr(model, n)]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        modules_to_save=keep or None)
    return get_peft_model(model, config)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def merged_state_dict(peft_model, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold W + (alpha/r) * B @ A into each base weight; keys as the base model names them.

    Works on a consolidated state dict (ZeRO-3 shards gathered), so the live model is
    never modified.
    """
    config = peft_model.peft_config["default"]
    scale = config.lora_alpha / config.r
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if "lora_A." in key or "lora_B." in key or ".original_module." in key:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        if key.endswith(".base_layer.weight"):
            stem = key[: -len(".base_layer.weight")]
            a, b = sd[f"{stem}.lora_A.default.weight"], sd[f"{stem}.lora_B.default.weight"]
            value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
        out[name] = value
    return out
