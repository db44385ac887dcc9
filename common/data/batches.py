"""Resumable data order and padding.

The order of an epoch is a permutation seeded by (seed, epoch); each optimizer step
takes the next `world * micro_batch` indices and every rank its slice. A resumed run
recomputes the same permutation and skips the batches already consumed, so no sample
is seen twice or skipped.
"""
from __future__ import annotations

import torch


class ResumableBatches:
    def __init__(self, n: int, micro_batch: int, rank: int, world: int, seed: int, shuffle: bool = True):
        self.n, self.micro_batch, self.rank, self.world = n, micro_batch, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = micro_batch * world

    def __len__(self) -> int:
        """Micro-batches per epoch on each rank (the last partial global batch is dropped)."""
        return self.n // self.global_batch

    def epoch(self, epoch: int, start: int = 0):
        """This rank's index lists for `epoch`, from micro-batch `start` on."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for b in range(start, len(self)):
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            yield chunk[self.rank * self.micro_batch:(self.rank + 1) * self.micro_batch]


def eval_shard(n: int, rank: int, world: int) -> tuple[list[int], list[float]]:
    """A rank's share of an evaluation set, as (indices, weights).

    Every rank gets the same count (ZeRO-3 needs every rank in every forward); ranks
    short of a row repeat row 0 with weight 0, so each row counts exactly once.
    """
    per_rank = -(-n // world)
    idx = [rank + i * world for i in range(per_rank)]
    return [i if i < n else 0 for i in idx], [1.0 if i < n else 0.0 for i in idx]


def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) padded to the longest sequence on `side`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def labelled_collate(pad_id: int):
    """Right-pad `input_ids` (with `pad_id`) and `labels` (with IGNORE) of tokenised rows."""
    from common.data.encode import IGNORE

    def fn(rows: list[dict]) -> dict:
        ids, mask = pad([r["input_ids"] for r in rows], pad_id)
        labels, _ = pad([r["labels"] for r in rows], IGNORE)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return fn
