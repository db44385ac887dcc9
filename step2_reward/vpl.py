"""Personalised reward models (VPL) on last-token embeddings of the stage-1 backbone.

Context embeddings always come from the frozen backbone (computed once, cached); target
embeddings too (`--vpl_target_embeddings frozen`, only the head trains) or from the
backbone with LoRA adapters trained with the head (`lora`). The export is
self-contained: the backbone (LoRA merged), the head and its config, kind "vpl"; with
LoRA also the frozen backbone in `context_backbone/`, which embeds contexts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.config import arg
from common.data.prepare import prepare_tokenized
from common.data.schemas import PERSONAL
from common.embeddings import cached_embeddings, embed_sequences, last_token_hidden
from common.errors import ConfigError
from common.models import load_model, resolve_model_path
from common.tasks.personal import resolve_personal_spec
from common.trainer import Task, eval_batches, fit, plan_steps, weighted_sum_metrics
from common.vpl import CONTEXT_BACKBONE, VARIANTS, HeadConfig, VPLHead, objective, pair_loss, save_head
from step2_reward.vpl_data import collate, encode_personal, fixed_contexts, index_examples

KIND = "vpl"


@dataclass
class VPLArgs:
    vpl_variant: str = arg("vae", "--model_type vpl: 'vae' (the personalised model), or a baseline on the "
                           "same data: 'base' (plain Bradley-Terry), 'mean_and_variance', 'categorical'.",
                           choices=VARIANTS)
    vpl_latent_dim: int = arg(16, "VPL: size of the user latent z.")
    vpl_hidden_dim: int = arg(256, "VPL: width of the encoder and decoder MLPs.")
    vpl_attention_heads: int = arg(4, "VPL: heads of the self-attention across context pairs.")
    vpl_context_size: int = arg(8, "VPL: labelled pairs of the same user in each context (published: 2-8).")
    vpl_kl_weight: float = arg(0.01, "VPL vae: weight of KL(q(z|context) || N(0, I)) in the loss.")
    vpl_anneal_cycle: int = arg(100, "VPL vae: steps per cosine-cyclical KL anneal cycle (weight 0.1 -> 1).")
    vpl_target_embeddings: str = arg("frozen", "VPL: target embeddings from the frozen backbone "
                                     "(precomputed) or 'lora' (the backbone trained with LoRA, --lora_dim).",
                                     choices=("frozen", "lora"))
    vpl_embed_batch_size: int = arg(32, "VPL: sequences per forward when precomputing embeddings.")


class VPLModel(nn.Module):
    """What DeepSpeed trains: the head, plus the LoRA backbone when target embeddings train."""

    def __init__(self, head: VPLHead, backbone_path: str, backbone=None):
        super().__init__()
        self.head, self.backbone, self.backbone_path = head, backbone, backbone_path

    def forward(self, context, context_mask, targets=None, input_ids=None, attention_mask=None):
        if self.backbone is not None:
            targets = last_token_hidden(self.backbone, input_ids, attention_mask)
        return self.head(targets, context, context_mask)

    def save_pretrained(self, out_dir, state_dict: dict) -> None:
        """The export (called by the strategy on rank 0): backbone, head and its config."""
        from transformers import AutoModel

        from common.lora import merged_state_dict
        part = {p: {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)} for p in ("head.", "backbone.")}
        frozen = AutoModel.from_pretrained(self.backbone_path, dtype="auto")
        if self.backbone is None:
            frozen.save_pretrained(out_dir)
        else:  # targets read the tuned backbone, contexts the frozen one: both are needed
            merged = merged_state_dict(self.backbone, part["backbone."])
            self.backbone.get_base_model().save_pretrained(out_dir, state_dict=merged)
            frozen.save_pretrained(Path(out_dir) / CONTEXT_BACKBONE)
        save_head(out_dir, self.head.cfg, part["head."])


def run(cfg, strategy, tokenizer) -> dict:
    from transformers import AutoConfig, AutoModel
    lora = cfg.vpl_target_embeddings == "lora"
    if lora and cfg.lora_dim <= 0:
        raise ConfigError("--vpl_target_embeddings lora needs --lora_dim > 0")
    cfg.data_path = [resolve_personal_spec(p, cfg.seed) for p in cfg.data_path]  # 'pets': built once, locked
    train, evaluation, _ = prepare_tokenized(cfg, PERSONAL, tokenizer, encode_personal, stage=2, strategy=strategy)
    data = index_examples(train, evaluation, ",".join(cfg.data_path))
    backbone_path = resolve_model_path(cfg.model_name_or_path)
    hidden = AutoConfig.from_pretrained(backbone_path, trust_remote_code=cfg.trust_remote_code).hidden_size
    needed = sorted(data.pool_seqs() if lora else range(len(data.seqs)))
    seqs = [data.seqs[i] for i in needed]

    def compute() -> torch.Tensor:  # only on a cache miss: the frozen backbone, sharded like training
        frozen = strategy.prepare_frozen(load_model(cfg, strategy, AutoModel, train=False),
                                         zero_stage=cfg.zero_stage if cfg.zero_stage == 3 else 0)
        return embed_sequences(strategy, frozen, seqs, tokenizer.pad_token_id, cfg.vpl_embed_batch_size,
                               desc="VPL embeddings")
    part = cached_embeddings(strategy, cfg.data_output_path, backbone_path, seqs, cfg.max_seq_len, hidden, compute)
    table = torch.zeros(len(data.seqs), hidden)
    table[needed] = part
    head = VPLHead(HeadConfig(cfg.vpl_variant, hidden, cfg.vpl_latent_dim, cfg.vpl_hidden_dim, cfg.vpl_attention_heads,
                              extra={"max_seq_len": cfg.max_seq_len, "prompt_format": cfg.prompt_format,
                                     "context_size": cfg.vpl_context_size, "users": data.users,
                                     "target_embeddings": cfg.vpl_target_embeddings}))
    head.fit_standardisation(part)
    backbone = load_model(cfg, strategy, AutoModel, train=True) if lora else None
    model = VPLModel(head, backbone_path, backbone)
    total_steps = plan_steps(cfg, len(data.train), strategy.world_size)
    engine = strategy.prepare(model, total_steps)
    task = build_task(cfg, strategy, data, table, tokenizer.pad_token_id, head)
    return fit(cfg, strategy, engine, data.train, task, tokenizer, total_steps)


def device_batch(batch: dict, device) -> dict:
    keys = ("context", "context_mask", "targets", "input_ids", "attention_mask")
    return {k: batch[k].to(device) for k in keys if k in batch}


def build_task(cfg, strategy, data, table, pad_id: int, head: VPLHead) -> Task:
    frozen = cfg.vpl_target_embeddings == "frozen"
    batch_fn = collate(data, cfg.vpl_context_size, table, pad_id, frozen)
    eval_rows = fixed_contexts(data, data.eval, cfg.vpl_context_size, cfg.seed)

    def loss(engine, batch):
        raw, mu, logvar = engine(**device_batch(batch, engine.device))
        return objective(head, raw, mu, logvar, strategy.optimizer_steps(engine), cfg.vpl_kl_weight, cfg.vpl_anneal_cycle)

    def evaluate(engine):
        groups = {"": lambda b: torch.ones_like(b["user"], dtype=torch.bool)}
        if any(e["x"] for e in data.eval):
            groups.update(_controversial=lambda b: b["controversial"], _agreed=lambda b: ~b["controversial"])
        groups.update({f"_user_{name}": (lambda b, u=u: b["user"] == u) for u, name in enumerate(data.users)})
        sums, counts = {}, {}
        for batch, w in eval_batches(strategy, eval_rows, cfg.per_device_eval_batch_size, batch_fn):
            raw, _, _ = engine(**device_batch(batch, engine.device))
            chosen, rejected = (t.float().cpu() for t in raw.chunk(2))
            correct = (head.scores(chosen) > head.scores(rejected)).float()
            per_pair = pair_loss(head.cfg.variant, chosen, rejected)
            for suffix, select in groups.items():
                sel = w * select(batch).float()
                for name, value in (("accuracy", correct), ("loss", per_pair)):
                    sums[name + suffix] = sums.get(name + suffix, 0.0) + (sel * value).sum().item()
                    counts[name + suffix] = counts.get(name + suffix, 0.0) + sel.sum().item()
        return weighted_sum_metrics(strategy, sums, counts)

    return Task("vpl", KIND, batch_fn, loss, evaluate)
