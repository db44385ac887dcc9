"""One layer's attention map (the last by default) without leaving the fused attention path.

`output_attentions=True` forces eager attention in every layer. ABC needs one row of
one layer, so instead: hooks capture that attention module's query/key projections
(and rotary tables) during the ordinary forward pass, and the attention probabilities
are recomputed afterwards for the rows asked for. Every layer keeps sdpa / flash
attention, and the extra cost is one (B, H, rows, T) product.

Works for Llama-family attention (q_proj, k_proj, rotary embeddings: Llama, Mistral,
Qwen2, SmolLM, ...).
"""
from __future__ import annotations

import contextlib
import sys

import torch

from common.errors import ConfigError, DensehfError


class LayerAttention:
    def __init__(self, model: torch.nn.Module, layer: int = -1):
        attn = [m for _, m in model.named_modules()
                if hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "head_dim")]
        if not attn:
            raise DensehfError(f"{type(model).__name__}: attention credit needs a Llama-family "
                               "attention module (q_proj, k_proj, rotary)")
        if not -len(attn) <= layer < len(attn):
            raise ConfigError(f"--abc_attention_layer {layer}: {type(model).__name__} has {len(attn)} attention "
                              f"layers (0 to {len(attn) - 1}, or -1 for the last)")
        self.module = attn[layer]
        self.rotary = getattr(sys.modules[type(self.module).__module__], "apply_rotary_pos_emb", None)
        if self.rotary is None:
            raise DensehfError(f"{type(self.module).__name__}: no apply_rotary_pos_emb in its module")
        self.active = False
        self.captured: dict = {}
        self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self.module.q_proj.register_forward_hook(self._save("q"))
        self.module.k_proj.register_forward_hook(self._save("k"))

    def _pre_hook(self, module, args, kwargs):
        if self.active:
            self.captured["rope"] = kwargs.get("position_embeddings")

    def _save(self, key):
        def hook(module, args, output):
            if self.active:
                self.captured[key] = output.detach()
        return hook

    @contextlib.contextmanager
    def capture(self):
        """Run one forward inside this context; the layer's q/k are kept for `rows`."""
        self.captured, self.active = {}, True
        try:
            yield self
        finally:
            self.active = False

    def rows(self, mask: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention probabilities of query positions `queries` (B, Q) over keys.

        Returns (B, Q, T); keys are limited to attended (mask) positions not after the query.
        """
        m = self.module
        q, k = self.captured["q"], self.captured["k"]
        b, t, _ = q.shape
        q = q.view(b, t, -1, m.head_dim).transpose(1, 2)          # (B, Hq, T, d)
        k = k.view(b, t, -1, m.head_dim).transpose(1, 2)          # (B, Hkv, T, d)
        cos, sin = self.captured["rope"]
        q, k = self.rotary(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        q = q.gather(2, queries[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        logits = (q.float() @ k.float().transpose(-1, -2)) * m.scaling  # (B, H, Q, T)
        keys = torch.arange(t, device=mask.device)
        allowed = (mask[:, None, :].bool()) & (keys[None, None, :] <= queries[:, :, None])
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        return torch.softmax(logits, -1).mean(1)
