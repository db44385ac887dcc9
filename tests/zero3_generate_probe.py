"""Launched by test_zero3_generation.py under `deepspeed --num_gpus 2`: measures the bytes
all-gathered while a ZeRO-3 model generates, with and without `strategy.gathered`.

Prints one JSON line from rank 0: {"gathered": {new_tokens: bytes}, "per_layer": {...},
"model_bytes": ...}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

COUNT = {"n": 0}


def counting(fn):
    """Adds the bytes each all-gather returns (its output tensor, or list of tensors)."""
    def wrapped(*args, **kwargs):
        out = args[0] if args else kwargs.get("output_tensor", kwargs.get("tensor_list"))
        tensors = out if isinstance(out, (list, tuple)) else [out]
        COUNT["n"] += sum(t.numel() * t.element_size() for t in tensors)
        return fn(*args, **kwargs)
    return wrapped


# DeepSpeed binds its all-gather function when the process group starts: patch before.
dist.all_gather_into_tensor = counting(dist.all_gather_into_tensor)
dist.all_gather = counting(dist.all_gather)


def main() -> None:
    from transformers import AutoModelForCausalLM

    from common.models import load_model
    from common.strategy import DeepSpeedStrategy, close_distributed
    model_path = sys.argv[-1]  # the launcher puts --local_rank first
    cfg = SimpleNamespace(dtype="fp32", seed=0, dist_timeout_minutes=5.0, zero_stage=3, offload=False,
                          gradient_accumulation_steps=1, max_grad_norm=1.0, learning_rate=1e-4,
                          adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, attn_implementation="sdpa",
                          trust_remote_code=False, gradient_checkpointing=False, lora_dim=0)
    strategy = DeepSpeedStrategy(cfg)
    strategy.setup_distributed()
    engine = strategy.prepare_frozen(load_model(cfg, strategy, AutoModelForCausalLM, model_path, 3, train=False), 3)
    prompt = torch.tensor([[1, 5, 9, 13]] if strategy.rank == 0 else [[1, 7, 11, 20]])
    result = {"gathered": {}, "per_layer": {},
              "model_bytes": sum(p.ds_numel * p.element_size() for p in engine.module.parameters())}
    for new_tokens in (4, 16):
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, synced_gpus=True,
                      pad_token_id=0)
        COUNT["n"] = 0
        with strategy.gathered(engine) as module:
            once = module.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        result["gathered"][new_tokens] = COUNT["n"]
        COUNT["n"] = 0  # DeepSpeed's default: its hooks fetch the layers at every step
        default = engine.module.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        result["per_layer"][new_tokens] = COUNT["n"]
        result[f"same_tokens_{new_tokens}"] = torch.equal(once, default)
    if strategy.is_main:
        print("PROBE " + json.dumps(result), flush=True)
    close_distributed(skip_finalizers=True)  # after the per-layer baseline


if __name__ == "__main__":
    main()
