"""The MM1-shaped model: an open_clip image encoder, a connector to image_tokens tokens, a decoder-only LM.

Top to bottom: configs; the language model (RMSNorm, RoPE, attention that stays inside each packed document, SwiGLU,
a top-2 mixture of experts); the connectors of MM1's ablation (C-Abstractor, average pooling, attention pooling);
the image encoder; the model, whose forward gives the next-token loss of every text position.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mm1data.packing import CLIP_MEAN, CLIP_STD, SequenceConfig

log = logging.getLogger(__name__)
IMAGE_BUCKET = 8  # the encoder runs on a multiple of this many images (see MM1._insert_images)


@dataclass(frozen=True)
class VisionConfig:
    model: str = "ViT-L-14"  # any open_clip model; MM1: ViT-H-14-378-quickgelu (DFN-5B); ablations: ViT-L-14
    pretrained: str | None = None  # open_clip tag (dfn5b, openai, ...), local path, s3:// URI, or null (random)
    model_config: str | None = None  # an extra open_clip model config JSON (custom towers)
    freeze: bool = False  # MM1 trains everything; frozen: no gradients, eval mode
    grad_checkpointing: bool = False  # recompute the tower's activations in backward (memory for time)


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: str = "c_abstractor"  # CONNECTORS: c_abstractor (MM1) | avg_pool | attn_pool
    connector_depth: int = 3  # ResNet blocks before and after the C-Abstractor's pooling (Honeybee: 3)
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_hidden: int | None = None  # SwiGLU width; default 8/3 d_model rounded up to a multiple of 256 (LLaMA)
    moe_experts: int = 0  # experts in a mixture-of-experts FFN, top-2 routed; 0 = dense
    moe_every: int = 2  # every k-th layer's FFN is a MoE (MM1's MoE models: every other layer)
    moe_aux_weight: float = 0.01  # load-balancing loss weight (Switch Transformer)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention: str = "auto"  # ATTENTION: sdpa (dense boolean mask) | flex (block-sparse); auto: flex on CUDA
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model {self.d_model} must split into {self.n_heads} heads of an even size")
        if self.connector not in CONNECTORS:
            raise ValueError(f"unknown connector {self.connector!r} (known: {', '.join(CONNECTORS)})")
        if self.attention not in ("auto", *ATTENTION):
            raise ValueError(f"unknown attention {self.attention!r} (known: auto, {', '.join(ATTENTION)})")
        if self.moe_experts == 1 or self.moe_experts < 0 or self.moe_every < 1:
            raise ValueError("moe_experts must be 0 (dense) or >= 2, and moe_every >= 1")

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 256 * math.ceil(8 * self.d_model / 3 / 256)


# ------------------------------------------------------------------------------------------------- language model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)  # [T, head_dim / 2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]: rotate pairs (x[2i], x[2i+1]) by position * freq_i. Positions run over the whole packed
    sequence; attention never leaves a document and RoPE only sees relative offsets, so no per-document reset."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[: x.shape[2]], sin[: x.shape[2]]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2).type_as(x)


class SdpaAttention:
    """Dense boolean mask [B, 1, T, T]: causal and within one document piece (padding, id -1, sees only padding,
    so no row is empty). Works everywhere; memory O(T^2) per sequence."""

    @staticmethod
    def mask(document_ids: torch.Tensor) -> torch.Tensor:
        T = document_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
        return (causal & (document_ids[:, :, None] == document_ids[:, None, :]))[:, None]

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FlexAttention:
    """The same mask as a FlexAttention block mask: blocks outside every document are skipped, so packed sequences
    cost what their documents cost (fused kernels when compiled, i.e. on CUDA)."""

    @staticmethod
    @torch.compiler.disable  # built eagerly once per forward; the attention itself is compiled and fused
    def mask(document_ids: torch.Tensor) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(b: Any, h: Any, q: Any, k: Any) -> Any:
            return (q >= k) & (document_ids[b, q] == document_ids[b, k])

        B, T = document_ids.shape
        return create_block_mask(same_document, B, None, T, T, device=document_ids.device)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=mask)


ATTENTION = {"sdpa": SdpaAttention, "flex": FlexAttention}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, impl: Any) -> None:
        super().__init__()
        self.n_heads, self.impl = cfg.n_heads, impl
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: Any) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x [B,H,T,D]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = self.impl.attend(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoE(nn.Module):
    """Top-2 mixture of SwiGLU experts (MM1's MoE: top-2 gating), dropless: every token reaches its two experts.
    Returns the output and the Switch load-balancing loss E * sum_e(tokens share_e * mean router prob_e), which is
    1 when routing is uniform."""

    def __init__(self, dim: int, hidden: int, experts: int) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        probs = self.router(x).float().softmax(-1)
        weight, chosen = probs.topk(2, dim=-1)
        weight = (weight / weight.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # an expert with no tokens still runs (on none): DDP sees its grads
            out.index_add_(0, token, expert(x[token]) * weight[token, slot, None])
        share = F.one_hot(chosen, len(self.experts)).float().sum(1).mean(0) / 2
        return out.view(shape), len(self.experts) * (share * probs.mean(0)).sum()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, impl: Any, moe: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, impl)
        self.ffn = MoE(cfg.d_model, cfg.hidden, cfg.moe_experts) if moe else SwiGLU(cfg.d_model, cfg.hidden)

    def forward(self, x: torch.Tensor, rope: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.norm1(x), rope, mask)
        y = self.ffn(self.norm2(x))
        y, aux = y if isinstance(y, tuple) else (y, x.new_zeros((), dtype=torch.float32))
        return x + y, aux


# ---------------------------------------------------------------------------------------------------- connectors


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [N, C, H, W] map (no batch statistics: packing and DDP stay exact)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """Bottleneck residual block (1x1, 3x3, 1x1 convs with LayerNorm2d and SiLU), as in Honeybee's C-Abstractor."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = max(cout // 4, 16)
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), LayerNorm2d(mid), nn.SiLU(),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), LayerNorm2d(mid), nn.SiLU(),
            nn.Conv2d(mid, cout, 1, bias=False), LayerNorm2d(cout),
        )  # fmt: skip
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.skip(x) + self.body(x))


def _grid(tokens: int, connector: str) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"connector {connector} pools to a square grid: image_tokens {tokens} is not a square")
    return side


def _readout(cin: int, d_model: int) -> nn.Module:
    return nn.Sequential(nn.Linear(cin, d_model), nn.GELU(), nn.Linear(d_model, d_model))


class CAbstractor(nn.Module):
    """MM1's connector (Honeybee's C-Abstractor): ResNet blocks, adaptive average pooling to a sqrt(n) x sqrt(n)
    grid, ResNet blocks, then an MLP to the LM width. Locality-preserving, any number of output tokens."""

    def __init__(self, cin: int, cfg: ModelConfig, tokens: int) -> None:
        super().__init__()
        width = cin  # Honeybee keeps the encoder's width through the blocks
        self.pre = nn.Sequential(*[ResBlock(cin, width) for _ in range(cfg.connector_depth)])
        self.pool = nn.AdaptiveAvgPool2d(_grid(tokens, "c_abstractor"))
        self.post = nn.Sequential(*[ResBlock(width, width) for _ in range(cfg.connector_depth)])
        self.readout = _readout(width, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [M, C, H, W] -> [M, tokens, d_model]
        return self.readout(self.post(self.pool(self.pre(x))).flatten(2).transpose(1, 2))


class AvgPoolConnector(nn.Module):
    """MM1's ablation: average pooling to a sqrt(n) x sqrt(n) grid, then an MLP."""

    def __init__(self, cin: int, cfg: ModelConfig, tokens: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(_grid(tokens, "avg_pool"))
        self.readout = _readout(cin, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.pool(x).flatten(2).transpose(1, 2))


class AttnPoolConnector(nn.Module):
    """MM1's ablation: `tokens` learned queries cross-attend to the patch features (any token count), then an MLP."""

    def __init__(self, cin: int, cfg: ModelConfig, tokens: int) -> None:
        super().__init__()
        heads = max(1, cin // 64) if cin % max(1, cin // 64) == 0 else 1
        self.queries = nn.Parameter(torch.randn(tokens, cin) * cin**-0.5)
        self.norm = nn.LayerNorm(cin)
        self.attn = nn.MultiheadAttention(cin, heads, batch_first=True)
        self.readout = _readout(cin, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.norm(x.flatten(2).transpose(1, 2))  # [M, H*W, C]
        q = self.queries.expand(x.shape[0], -1, -1).to(kv.dtype)
        return self.readout(self.attn(q, kv, kv, need_weights=False)[0])


CONNECTORS = {"c_abstractor": CAbstractor, "avg_pool": AvgPoolConnector, "attn_pool": AttnPoolConnector}


# ------------------------------------------------------------------------------------------------- image encoder


class ImageEncoder(nn.Module):
    """An open_clip visual tower built at the manifest's image size (position embeddings resized for pretrained
    weights) -> the last block's patch features as a [M, C, H, W] map. Takes uint8 or float pixels, normalises with
    the tower's own mean and std."""

    def __init__(self, cfg: VisionConfig, image_size: int) -> None:
        super().__init__()
        import open_clip

        from mm1data.scorers.clip import open_clip_weights

        msg = f"vision.pretrained is null: the {cfg.model} image encoder starts from random weights"
        pretrained = open_clip_weights(cfg, msg)
        clip = open_clip.create_model(cfg.model, pretrained=pretrained, force_image_size=image_size)
        self.tower = clip.visual  # the text tower is dropped with `clip`
        mean, std = getattr(self.tower, "image_mean", None) or CLIP_MEAN, getattr(self.tower, "image_std", None)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.frozen = cfg.freeze
        if cfg.freeze:
            self.tower.requires_grad_(False)
        if cfg.grad_checkpointing:
            self.tower.set_grad_checkpointing(True)
        # One blank image through the features: their width, and the tower's parameters they never use (CLIP's
        # projection, pooling heads), which are frozen so that every trained parameter gets a gradient (DDP).
        feats = self.features(torch.zeros(1, 3, image_size, image_size))
        self.channels = feats.shape[1]
        if not cfg.freeze:
            feats.sum().backward()
            for p in self.tower.parameters():
                p.requires_grad_(p.grad is not None)
                p.grad = None

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels.float()).to(self.mean.dtype)
        x = (x - self.mean) / self.std
        out = self.tower.forward_intermediates(x, indices=1, normalize_intermediates=True, intermediates_only=True)
        return out["image_intermediates"][-1]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            self.tower.eval()
            with torch.no_grad():
                return self.features(pixels)
        return self.features(pixels)


# --------------------------------------------------------------------------------------------------------- model


class MM1(nn.Module):
    """Image encoder -> connector -> decoder-only LM over packed sequences (mm1data.packing.collate batches).

    The connector's image_tokens outputs of each image replace the image's placeholder positions (in document
    order); attention stays inside each document piece; the loss is next-token cross-entropy on text targets only.
    """

    def __init__(self, cfg: ModelConfig, seq: SequenceConfig, vocab_size: int, image_id: int) -> None:
        super().__init__()
        self.cfg, self.seq, self.image_id = cfg, seq, image_id
        impl = ATTENTION[cfg.attention if cfg.attention != "auto" else "sdpa"]
        self.attention = impl  # train.py switches "auto" to flex on CUDA (set_attention)
        self.encoder = ImageEncoder(cfg.vision, seq.image_size)
        self.connector = CONNECTORS[cfg.connector](self.encoder.channels, cfg, seq.image_tokens)
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        moe = [cfg.moe_experts > 0 and (i + 1) % cfg.moe_every == 0 for i in range(cfg.n_layers)]
        self.blocks = nn.ModuleList(Block(cfg, impl, m) for m in moe)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, seq.max_tokens, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():  # GPT-2 init for the LM and connector; the encoder keeps its own
            if not name.startswith("encoder.") and p.dim() >= 2:
                std = (
                    cfg.init_std / math.sqrt(2 * cfg.n_layers)
                    if name.endswith(("proj.weight", "down.weight"))
                    else cfg.init_std
                )
                nn.init.normal_(p, 0.0, std)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def set_attention(self, name: str) -> None:
        self.attention = ATTENTION[name]
        for block in self.blocks:
            block.attn.impl = self.attention

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss [B, T-1] of predicting token t+1 at position t, zero where it is not a target; targets [B, T-1]
        bool: a text token of the same document piece; the MoE load-balancing loss, averaged over MoE layers)."""
        ids, docs = batch["input_ids"], batch["document_ids"]
        x = self.embed(ids)
        x = self._insert_images(x, ids, batch["images"], batch["num_images"])
        mask = self.attention.mask(docs)
        rope = (self.rope_cos, self.rope_sin)
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, a = block(x, rope, mask)
            aux = aux + a
        logits = self.head(self.norm(x[:, :-1])).float()
        targets = batch["loss_mask"][:, 1:] & (docs[:, 1:] == docs[:, :-1]) & (docs[:, :-1] >= 0)
        loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * targets
        n_moe = sum(isinstance(b.ffn, MoE) for b in self.blocks)
        return loss, targets, aux / max(n_moe, 1)

    def _insert_images(
        self, x: torch.Tensor, ids: torch.Tensor, images: torch.Tensor, num: torch.Tensor
    ) -> torch.Tensor:
        """Encode the real images ([B, N, ...] padded, num [B]) and write their tokens over the placeholders, which
        packing laid out in row-major (sequence, image) order. The encoder sees a multiple of IMAGE_BUCKET images
        (blank ones added): a new image count is a new kernel plan (oneDNN) or a recompile (torch.compile), which
        cost seconds, so few counts are better than exact ones."""
        N = images.shape[1]
        pixels = images[torch.arange(N, device=num.device)[None, :] < num[:, None]]  # [M, 3, S, S]
        M = pixels.shape[0]
        pad = -M % IMAGE_BUCKET if M else IMAGE_BUCKET  # a text-only batch still runs the encoder: DDP wants
        if pad:  # every parameter used
            pixels = torch.cat([pixels, pixels.new_zeros(pad, *pixels.shape[1:])])
        tokens = self.connector(self.encoder(pixels)).to(x.dtype)  # [M + pad, image_tokens, d_model]
        if M == 0:
            return x + 0.0 * tokens.sum()
        where = (ids == self.image_id)[..., None]
        return x.masked_scatter(where, tokens[:M].reshape(-1, x.shape[-1]))

    def num_params(self, part: str = "") -> int:
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith(part))

    def flops(self, sequence: int) -> tuple[float, float]:
        """Model FLOPs of forward + backward (PaLM's count) per position and per image: 6 per active LM parameter
        (a MoE layer counts two experts) plus 12 * layers * d_model * sequence for attention per position; the
        encoder's 6 (2 when frozen: forward only) per parameter per patch. The connector is left out."""
        cfg = self.cfg
        lm = self.num_params("blocks.") + self.num_params("head.")
        for b in self.blocks:
            if isinstance(b.ffn, MoE):
                lm -= (len(b.ffn.experts) - 2) * sum(p.numel() for p in b.ffn.experts[0].parameters())
        patches = (self.seq.image_size // _patch(self.encoder.tower)) ** 2 + 1
        per_image = (2 if self.encoder.frozen else 6) * self.num_params("encoder.") * patches
        return 6 * lm + 12 * cfg.n_layers * cfg.d_model * sequence, per_image


def _patch(tower: nn.Module) -> int:
    patch = getattr(tower, "patch_size", None) or getattr(getattr(tower, "conv1", None), "kernel_size", None) or 32
    return patch[0] if isinstance(patch, (tuple, list)) else int(patch)
