"""VPL (variational preference learning, Poddar et al. 2024): personalised reward heads.

A user is a handful of their own labelled pairs. The encoder reads them as a set (an
MLP per pair, self-attention across pairs, mean pooling) and gives q(z | context); the
decoder scores a response embedding given z. Unlike the released code, the decoder
really reads z and the sampling noise is not scaled down. The baselines (`base`,
`mean_and_variance`, `categorical`) use the same decoder without z. Everything works on
last-token embeddings (common/embeddings.py), shared by stage 2 (training) and stage 3
(a personalised reward).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from common.data.schemas import Schema
from common.errors import ConfigError, DataError

VARIANTS = ("vae", "base", "mean_and_variance", "categorical")
N_ATOMS, ENTROPY_BONUS, ANNEAL_FLOOR = 10, 0.1, 0.1
HEAD_FILE, CONFIG_FILE = "vpl_head.safetensors", "vpl_config.json"
CONTEXT_BACKBONE = "context_backbone"  # in an export whose target backbone was tuned (LoRA)
OUT_DIMS = {"vae": 1, "base": 1, "mean_and_variance": 2, "categorical": N_ATOMS}


@dataclass
class HeadConfig:
    variant: str
    embed_dim: int
    latent_dim: int = 16
    hidden_dim: int = 256
    attention_heads: int = 4
    extra: dict = dataclasses.field(default_factory=dict)  # how embeddings were made (max_seq_len, ...)

    def save(self, out_dir: Path) -> None:
        (Path(out_dir) / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, folder: Path) -> "HeadConfig":
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise DataError(str(path), "missing: not a VPL export (stage 2 --model_type vpl)")
        data = json.loads(path.read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) - names or "variant" not in data or data["variant"] not in VARIANTS:
            raise DataError(str(path), f"expected fields {sorted(names)} with variant one of {VARIANTS}")
        return cls(**data)


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


class SetAttention(nn.Module):
    """Self-attention across a user's context pairs; plain Linear calls, so ZeRO-3 gathers them."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, k, d = x.shape
        q, key, v = self.qkv(x).view(b, k, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, key, v, attn_mask=mask.bool()[:, None, None, :])
        return self.out(att.transpose(1, 2).reshape(b, k, d))


class PairEncoder(nn.Module):
    """q(z | context): [e_c; e_r] per pair -> MLP -> self-attention -> mean pool -> mu, log sigma^2."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.pair = mlp(2 * cfg.embed_dim, cfg.hidden_dim, cfg.hidden_dim)
        self.attention = SetAttention(cfg.hidden_dim, cfg.attention_heads)
        self.out = nn.Linear(cfg.hidden_dim, 2 * cfg.latent_dim)

    def forward(self, context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.attention(self.pair(context), mask)
        m = mask.to(h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        mu, logvar = self.out(pooled).chunk(2, -1)
        return mu.clamp(-1, 1), logvar.clamp(-1, 1)


def latent(mu: torch.Tensor, logvar: torch.Tensor, sample: bool) -> torch.Tensor:
    """z = mu (+ sigma * eps when sampling), L2-normalised and scaled by sqrt(latent_dim)."""
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu
    return F.normalize(z, dim=-1) * math.sqrt(mu.shape[-1])


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per user: shape (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def anneal(step: int, cycle: int) -> float:
    """Cosine-cyclical KL weight: ANNEAL_FLOOR at the start of each `cycle` steps, rising towards 1."""
    phase = (step % cycle) / cycle
    return ANNEAL_FLOOR + (1 - ANNEAL_FLOOR) * (1 - math.cos(math.pi * phase)) / 2


class VPLHead(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = PairEncoder(cfg) if cfg.variant == "vae" else None
        z_dim = cfg.latent_dim if self.encoder is not None else 0
        self.decoder = mlp(cfg.embed_dim + z_dim, cfg.hidden_dim, OUT_DIMS[cfg.variant])
        self.register_buffer("atoms", torch.linspace(0, 1, N_ATOMS), persistent=False)
        # embeddings are standardised per dimension with the training table's statistics: a
        # backbone's last-token states share a large common component that hides the
        # differences between responses (measured: VPL on Pets escapes its plateau 2-3x sooner)
        self.register_buffer("embed_mean", torch.zeros(cfg.embed_dim))
        self.register_buffer("embed_std", torch.ones(cfg.embed_dim))

    @torch.no_grad()
    def fit_standardisation(self, table: torch.Tensor) -> None:
        self.embed_mean.copy_(table.float().mean(0))
        self.embed_std.copy_(table.float().std(0).clamp(min=1e-6))

    def standardise(self, e: torch.Tensor) -> torch.Tensor:
        return (e - self.embed_mean.to(e.dtype)) / self.embed_std.to(e.dtype)

    def user_latent(self, context: torch.Tensor, mask: torch.Tensor, sample: bool = False):
        """(z, mu, logvar) for B contexts; z is mu (normalised) unless sampling."""
        if self.encoder is None:
            return None, None, None
        b, k, _ = context.shape
        context = self.standardise(context.view(b, k, 2, -1)).view(b, k, -1)
        mu, logvar = self.encoder(context, mask)
        return latent(mu, logvar, sample), mu, logvar

    def outputs(self, targets: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
        """Raw decoder outputs for target embeddings (N, E) given each one's z (N, L)."""
        targets = self.standardise(targets)
        return self.decoder(targets if z is None else torch.cat([targets, z.to(targets.dtype)], -1))

    def scores(self, raw: torch.Tensor) -> torch.Tensor:
        """The scalar reward: the output, the Gaussian's mean, or the categorical's expectation."""
        if self.cfg.variant == "categorical":
            return raw.float().softmax(-1) @ self.atoms.float()
        return raw[:, 0].float()

    def forward(self, targets: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None):
        """targets (2B, E): chosen then rejected; context (B, K, 2E). -> (raw (2B, out), mu, logvar)."""
        z, mu, logvar = (self.user_latent(context, context_mask, sample=self.training)
                         if self.encoder is not None else (None, None, None))
        return self.outputs(targets, None if z is None else torch.cat([z, z])), mu, logvar


def pair_loss(variant: str, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair preference loss of each variant, from raw decoder outputs."""
    if variant in ("vae", "base"):
        return -F.logsigmoid(chosen[:, 0] - rejected[:, 0])
    if variant == "mean_and_variance":
        var_c, var_r = F.softplus(chosen[:, 1]) + 1e-4, F.softplus(rejected[:, 1]) + 1e-4
        return F.softplus(-math.sqrt(2 * math.pi) * (chosen[:, 0] - rejected[:, 0]) / torch.sqrt(var_c + var_r))
    p_c, p_r = chosen.float().softmax(-1), rejected.float().softmax(-1)
    win = (p_c[:, :, None] * p_r[:, None, :] * _beats(chosen.shape[-1], chosen.device)).sum((1, 2))
    entropy = -(p_c * p_c.clamp(min=1e-12).log()).sum(-1) - (p_r * p_r.clamp(min=1e-12).log()).sum(-1)
    return -win.clamp(min=1e-12).log() - ENTROPY_BONUS * entropy / 2


def _beats(n: int, device) -> torch.Tensor:
    """[i, j] = 1 if atom i > atom j, 0.5 on ties."""
    i = torch.arange(n, device=device)
    return (i[:, None] > i[None, :]).float() + 0.5 * torch.eye(n, device=device)


def objective(head: VPLHead, raw: torch.Tensor, mu, logvar, step: int, kl_weight: float,
              cycle: int) -> tuple[torch.Tensor, dict]:
    """The training loss (ELBO for `vae`) of one batch and its metrics."""
    chosen, rejected = raw.chunk(2)
    loss = pair_loss(head.cfg.variant, chosen, rejected).mean()
    metrics = {"accuracy": (head.scores(chosen) > head.scores(rejected)).float().mean().item(),
               "preference_loss": loss.item()}
    if mu is not None:
        kl, weight = kl_divergence(mu, logvar).mean(), kl_weight * anneal(step, cycle)
        loss = loss + weight * kl
        metrics.update(kl=kl.item(), kl_weight=weight)
    return loss, metrics


def save_head(out_dir: Path, cfg: HeadConfig, state_dict: dict) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(Path(out_dir) / HEAD_FILE))
    cfg.save(out_dir)


def load_head(folder: Path) -> VPLHead:
    from safetensors.torch import load_file
    cfg = HeadConfig.load(folder)
    head = VPLHead(cfg)
    path = Path(folder) / HEAD_FILE
    try:
        head.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError) as e:
        raise DataError(str(path), f"does not match {CONFIG_FILE} ({str(e).splitlines()[0]})") from None
    return head.eval()


CONTEXT = Schema("vpl_context", ("prompt", "chosen", "rejected"), may_be_empty=("prompt",),
                 optional=("user", "survey"))


def read_context(path: str, user: str) -> list[dict]:
    """One user's labelled pairs (their `survey` rows when marked) from a JSONL/JSON/... file."""
    from common.data.loaders import read_file
    if not path:
        raise ConfigError("--reward_model_type vpl needs --vpl_context_path: a file of the user's "
                          "labelled pairs (prompt, chosen, rejected[, user])")
    rows = read_file(Path(path), CONTEXT)
    if user:
        users = sorted({str(r["user"]) for r in rows if "user" in r})
        rows = [r for r in rows if str(r.get("user")) == user]
        if not rows:
            raise DataError(f"{path}: field 'user'", f"no rows of --vpl_user {user!r} "
                                                     f"(users in this file: {', '.join(users) or 'none'})")
    if not rows:
        raise DataError(path, "no context pairs: VPL infers the user's latent from their labelled pairs")
    return survey_or_all(rows)


def survey_or_all(rows: list[dict]) -> list[dict]:
    """A user's `survey` rows when some are marked (UltraFeedback-P's context pool), else all."""
    return [r for r in rows if r.get("survey")] or rows


def read_user_contexts(path: str) -> dict[str, list[dict]]:
    """Every user's pairs (their `survey` rows when marked): the z of prompts that name a user."""
    from common.data.loaders import read_file
    by_user: dict[str, list[dict]] = {}
    for r in read_file(Path(path), CONTEXT):
        if r.get("user") is not None:
            by_user.setdefault(str(r["user"]), []).append(r)
    return {u: survey_or_all(rows) for u, rows in by_user.items()}


def context_backbone_path(folder: str) -> str:
    """Where an export's context encoder backbone is: its own folder unless LoRA tuned the targets."""
    sub = Path(folder) / CONTEXT_BACKBONE
    return str(sub) if (sub / "config.json").is_file() else str(folder)


def check_backbone(head: VPLHead, hidden_size: int, folder: str) -> None:
    """A head trained on another backbone's embeddings would score noise: refuse it."""
    if head.cfg.embed_dim != hidden_size:
        raise DataError(f"{Path(folder) / CONFIG_FILE}: field 'embed_dim'",
                        f"{head.cfg.embed_dim} does not match the backbone's hidden size {hidden_size} "
                        f"({Path(folder) / 'config.json'}): head and backbone come from different models")
