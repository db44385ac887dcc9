"""Last-token embeddings of a causal LM, computed once per (backbone, data, max length).

VPL reads a sequence as the backbone's last-layer hidden state at its last real token.
A frozen backbone needs each distinct sequence once: every rank embeds its share (equal
counts, so ZeRO-3 ranks stay in step), the shares are gathered, and rank 0 caches the
table as safetensors under --data_output_path.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from common.data.batches import eval_shard, pad
from common.errors import DataError
from common.heads import backbone_module, last_token_index, position_ids

CACHE_VERSION = 1


def last_token_hidden(model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, hidden) last-layer state at each row's last real token (by the mask; any padding side)."""
    out = backbone_module(model)(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask),
                                 use_cache=False)
    hidden = out.last_hidden_state
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(mask)].float()


@torch.no_grad()
def embed_sequences(strategy, model, seqs: list[list[int]], pad_id: int, batch_size: int,
                    desc: str = "embeddings") -> torch.Tensor:
    """(len(seqs), hidden) for token-id sequences, split over the ranks and gathered on all."""
    idx, _ = eval_shard(len(seqs), strategy.rank, strategy.world_size)
    device = next(model.parameters()).device
    bar = None
    if strategy.is_main:
        from tqdm import tqdm
        bar = tqdm(total=len(idx), desc=desc, mininterval=2.0, file=sys.stderr)
    parts = []
    for i in range(0, len(idx), batch_size):
        ids, mask = pad([seqs[j] for j in idx[i:i + batch_size]], pad_id)
        parts.append(last_token_hidden(model, ids.to(device), mask.to(device)).cpu())
        if bar is not None:
            bar.update(len(parts[-1]))
    if bar is not None:
        bar.close()
    local = torch.cat(parts)
    gathered = strategy.all_gather_cat(local.to(strategy.device)).cpu()
    # rank r's i-th row is sequence r + i * world (eval_shard's interleaving)
    order = gathered.view(strategy.world_size, -1, local.shape[-1]).transpose(0, 1).reshape(-1, local.shape[-1])
    return order[: len(seqs)].contiguous()


def source_identity(path: str) -> list:
    """What changes when a backbone changes: its files' names, sizes and times (or its hub name)."""
    p = Path(path)
    if not p.is_dir():
        return [path]
    return [path] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.iterdir()) if f.is_file()]


def cache_path(cache_dir: str, backbone_path: str, seqs: list[list[int]], max_len: int) -> Path:
    data = hashlib.sha256(json.dumps(seqs).encode()).hexdigest()
    key = json.dumps([CACHE_VERSION, source_identity(backbone_path), data, max_len])
    return Path(cache_dir) / f"embeddings-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def cached_embeddings(strategy, cache_dir: str, backbone_path: str, seqs: list[list[int]], max_len: int,
                      hidden_size: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The embedding table of `seqs`, from the cache or from `compute()` (then cached by rank 0)."""
    from safetensors.torch import load_file, save_file
    path = cache_path(cache_dir, backbone_path, seqs, max_len)
    strategy.barrier()  # every rank sees the same cache state
    if path.is_file():
        table = load_file(str(path))["embeddings"]
        if tuple(table.shape) != (len(seqs), hidden_size):
            raise DataError(str(path), f"cached embeddings of shape {tuple(table.shape)}, expected "
                                       f"({len(seqs)}, {hidden_size}) for this backbone: delete the file")
        return table
    table = compute()
    if strategy.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({"embeddings": table}, str(tmp))
        os.replace(tmp, path)
    strategy.barrier()
    return table
