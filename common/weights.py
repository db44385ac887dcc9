"""Whole weights across ZeRO shards: gathered for generation, averaged into an EMA, saved,
loaded, exported, or pushed block by block to an inference engine.

A mixin of `DeepSpeedStrategy` (it uses `is_main` and `barrier`): the strategy's seam between
running engines and moving their full weights in and out.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Optional

import torch


def engine_zero_stage(engine) -> int:
    return engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0


class ZeroWeights:
    @contextlib.contextmanager
    def gathered(self, engine):
        """Gather all ZeRO-3 shards once, for a whole `generate` call.

        Gathering alone is not enough: ZeRO-3's module hooks would release and re-gather
        every layer at every decoding step. DeepSpeed's `unwrap_model_for_generation`
        also lifts those hooks until the context ends.
        """
        if engine_zero_stage(engine) != 3:
            yield engine.module
            return
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
        with unwrap_model_for_generation(engine):
            yield engine.module

    @torch.no_grad()
    def ema_update(self, engine, ema_engine, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * weights, parameter by parameter (gathered under ZeRO-3)."""
        import deepspeed
        zero3 = engine_zero_stage(engine) == 3 or engine_zero_stage(ema_engine) == 3
        for p, q in zip(engine.module.parameters(), ema_engine.module.parameters()):
            with deepspeed.zero.GatheredParameters([p, q], modifier_rank=0, enabled=zero3):
                if not zero3 or self.is_main:
                    q.data.lerp_(p.data.to(q.dtype), 1.0 - decay)

    def save_weights(self, engine, path: Path) -> None:
        """Weights only (a frozen engine such as the EMA has no DeepSpeed optimizer checkpoint)."""
        from safetensors.torch import save_file
        sd = self.full_state_dict(engine)
        if self.is_main:
            save_file(sd, str(path))

    @torch.no_grad()
    def load_weights(self, engine, path: Path) -> None:
        import deepspeed
        from safetensors.torch import load_file
        sd = load_file(str(path))
        zero3 = engine_zero_stage(engine) == 3
        for name, p in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=zero3):
                if not zero3 or self.is_main:
                    p.data.copy_(sd[name])

    def full_state_dict(self, engine) -> Optional[dict]:
        """Consolidated weights on rank 0 (None elsewhere); a collective under ZeRO-3."""
        if engine_zero_stage(engine) == 3:
            sd = engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = engine.module.state_dict() if self.is_main else None
        if sd is None:
            return None
        return {k: v.detach().cpu().clone() for k, v in sd.items()}

    def export_hf(self, engine, tokenizer, out_dir: Path | str) -> Optional[Path]:
        """Write a `save_pretrained` folder (safetensors + tokenizer) loadable without densehf.

        LoRA weights are merged into the base weights first. transformers 5 writes only
        safetensors (its `safe_serialization` flag is gone), so no pickle is ever exported.
        """
        from common.lora import is_peft, merged_state_dict
        out_dir = Path(out_dir)
        sd = self.full_state_dict(engine)
        if self.is_main:
            module = engine.module
            if is_peft(module):
                sd, module = merged_state_dict(module, sd), module.get_base_model()
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            _rmtree(tmp)
            module.save_pretrained(tmp, state_dict=sd)
            tokenizer.save_pretrained(tmp)
            _rmtree(out_dir)
            os.replace(tmp, out_dir)
        self.barrier()
        return out_dir

    @torch.no_grad()
    def gathered_blocks(self, engine):
        """Yield the weights as {name: full tensor} one block at a time, for pushing them into an
        inference engine (vLLM) without gathering the whole model under ZeRO-3.

        A block is a repeated layer (a child of a ModuleList: a decoder layer, so fused groups such
        as q/k/v and gate/up travel together) or a whole module holding no ModuleList (embeddings,
        final norm, head; a LoRA-wrapped one with its adapters). Tensors are views of the gathered
        weights, valid until the next block. A collective under ZeRO-3: every rank must consume it all.
        """
        import deepspeed
        zero3 = engine_zero_stage(engine) == 3
        model = engine.module
        layers = {id(m) for lst in model.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst}
        holds_list = {id(m) for m in model.modules() if any(isinstance(x, torch.nn.ModuleList) for x in m.modules())}
        done: set[int] = set()
        for prefix, module in model.named_modules():
            whole = id(module) in layers or id(module) not in holds_list
            block = {n: p for n, p in module.named_parameters(prefix=prefix, recurse=whole) if id(p) not in done}
            if not block:
                continue
            done.update(id(p) for p in block.values())
            with deepspeed.zero.GatheredParameters(list(block.values()), enabled=zero3):
                yield {n: p.detach() for n, p in block.items()}


def _rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
