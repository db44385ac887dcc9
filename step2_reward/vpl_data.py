"""VPL examples: pairs as indices into a table of distinct sequences, and users' context pools.

A target pair is scored given a context: up to K other labelled pairs of the same user,
drawn from the user's pool (their `survey` rows when the data marks any, else all their
training rows; never the target pair itself). Training draws a fresh context per
example from the global torch RNG (checkpointed, so resume stays exact); evaluation
uses one fixed, seeded context per example.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.data.batches import pad
from common.data.encode import encode_pair
from common.errors import DataError


def encode_personal(tokenizer, row: dict, max_len: int, prompt_format: str, too_long: str):
    """A PERSONAL row -> chosen/rejected ids plus its user and flags."""
    pair = encode_pair(tokenizer, row, max_len, prompt_format, too_long)
    if pair is None:
        return None
    return {**pair, "user": row["user"], "controversial": bool(row.get("controversial", False)),
            "survey": bool(row.get("survey", False))}


@dataclass
class VPLData:
    seqs: list[list[int]]            # distinct token sequences (prompt + response + EOS)
    users: list[str]                 # sorted user names; examples hold their index
    train: list[dict]                # {"c", "r": seq index, "u": user index, "x": controversial}
    eval: list[dict]
    pools: dict[int, torch.Tensor]   # user index -> (P, 2) chosen/rejected seq indices

    def pool_seqs(self) -> set[int]:
        return {int(i) for pool in self.pools.values() for i in pool.flatten()}


def index_examples(train_rows, eval_rows, source: str) -> VPLData:
    seq_index: dict[tuple, int] = {}
    users = sorted({r["user"] for r in train_rows})

    def index(rows, split):
        out = []
        for r in rows:
            if r["user"] not in users:
                raise DataError(source, f"{split} rows of user {r['user']!r} have no training rows "
                                        f"to take a context from (users: {', '.join(users)})")
            c = seq_index.setdefault(tuple(r["chosen_ids"]), len(seq_index))
            rj = seq_index.setdefault(tuple(r["rejected_ids"]), len(seq_index))
            out.append({"c": c, "r": rj, "u": users.index(r["user"]), "x": bool(r["controversial"]),
                        "survey": bool(r["survey"])})
        return out
    train, evaluation = index(train_rows, "train"), index(eval_rows, "eval")
    pools = {}
    for u, name in enumerate(users):
        mine = [e for e in train if e["u"] == u]
        pool = [e for e in mine if e["survey"]] or mine
        if len(pool) < 2:
            raise DataError(source, f"user {name!r} has {len(pool)} context pair(s); VPL needs at least 2")
        pools[u] = torch.tensor([[e["c"], e["r"]] for e in pool])
    if any(e["survey"] for e in train):  # survey rows are contexts only
        train = [e for e in train if not e["survey"]]
    return VPLData([list(s) for s in seq_index], users, train, evaluation, pools)


def draw_context(pool: torch.Tensor, k: int, exclude: tuple[int, int], generator=None):
    """(k, 2) pair indices and a (k,) mask: k distinct pool pairs other than `exclude`."""
    order = torch.randperm(len(pool), generator=generator)[: k + 1]
    picked = pool[order]
    picked = picked[~((picked[:, 0] == exclude[0]) & (picked[:, 1] == exclude[1]))][:k]
    mask = torch.zeros(k, dtype=torch.bool)
    mask[: len(picked)] = True
    out = torch.zeros(k, 2, dtype=torch.long)
    out[: len(picked)] = picked
    return out, mask


def fixed_contexts(data: VPLData, rows: list[dict], k: int, seed: int) -> list[dict]:
    """Rows with a context attached once (evaluation: the same context every time)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for e in rows:
        ctx, mask = draw_context(data.pools[e["u"]], k, (e["c"], e["r"]), g)
        out.append({**e, "ctx": ctx, "ctx_mask": mask})
    return out


def collate(data: VPLData, k: int, table: torch.Tensor, pad_id: int, frozen_targets: bool):
    """Rows -> model inputs: context embeddings (B, K, 2E) and target embeddings or ids (2B)."""
    def fn(rows: list[dict]) -> dict:
        drawn = [(e["ctx"], e["ctx_mask"]) if "ctx" in e else draw_context(data.pools[e["u"]], k, (e["c"], e["r"]))
                 for e in rows]
        ctx = torch.stack([c for c, _ in drawn])
        batch = {"context": torch.cat([table[ctx[..., 0]], table[ctx[..., 1]]], -1),
                 "context_mask": torch.stack([m for _, m in drawn]),
                 "user": torch.tensor([e["u"] for e in rows]),
                 "controversial": torch.tensor([e["x"] for e in rows])}
        targets = [e["c"] for e in rows] + [e["r"] for e in rows]
        if frozen_targets:
            batch["targets"] = table[torch.tensor(targets)]
        else:
            batch["input_ids"], batch["attention_mask"] = pad([data.seqs[i] for i in targets], pad_id)
        return batch
    return fn
