"""The LOCA network: a timm ``VisionTransformer`` encoder f (no class token), the projection head with
weight-normalised prototypes Q, one cross-attention block g, a final norm and the position head W.

Only the cross-attention block is hand-written (timm has no pre-norm block with separate query and key/value
norms); everything else is timm's, so the encoder's weights load into ``timm.create_model``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, get_act_layer, lecun_normal_, resample_abs_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer

from .config import Config

GELU_TANH = "gelu_tanh"


def timm_kwargs(cfg: Config) -> Dict:
    """Arguments that rebuild the encoder with ``timm.create_model(name, **kwargs)`` or
    ``VisionTransformer(**kwargs)``; stored in every ``backbone.safetensors``."""
    m = cfg.model
    cls = cfg.loss.cluster_level == "cls"  # the Tab. 2b ablation adds a class token (without position embedding)
    return dict(img_size=cfg.views.reference_size, patch_size=m.patch_size, embed_dim=m.width, depth=m.depth,
                num_heads=m.heads, mlp_ratio=m.mlp_ratio, class_token=cls, no_embed_class=cls,
                global_pool="token" if cls else "avg", fc_norm=False, num_classes=0, act_layer=GELU_TANH,
                dynamic_img_size=True)


def timm_model_name(cfg: Config) -> str:
    """The closest timm registry name (its kwargs above override everything that differs)."""
    by_width = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
    size = by_width.get(cfg.model.width, "small")
    return "vit_huge_patch14_224" if size == "huge" else f"vit_{size}_patch16_224"


class Encoder(nn.Module):
    """f: patch embedding + learned position embedding (bilinearly resized with antialiasing for other grids,
    as the official JAX resize) + timm blocks + final norm. Optionally keeps only ``keep`` tokens, the same
    for the whole batch, after the position embedding and before the blocks (the random query's drop). With
    loss.cluster_level=cls a class token goes first (``prefix`` = 1); LOCA itself has none. Built with timm's
    weight_init="skip", it is not initialised on its own (the position embedding is uninitialised memory):
    ``LOCA`` applies the official init (``official_init_``)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.vit = VisionTransformer(drop_path_rate=cfg.model.drop_path, weight_init="skip", **timm_kwargs(cfg))
        self.grid = tuple(self.vit.patch_embed.grid_size)
        self.grad_checkpointing = cfg.model.grad_checkpointing
        self.prefix = 1 if self.vit.cls_token is not None else 0  # tokens before the patches in the output

    @property
    def width(self) -> int:
        return self.vit.embed_dim

    def position_embedding(self, grid_hw) -> torch.Tensor:
        return resample_abs_pos_embed(self.vit.pos_embed, new_size=list(grid_hw), old_size=list(self.grid),
                                      num_prefix_tokens=0, interpolation="bilinear", antialias=True)

    def forward(self, images: torch.Tensor, keep: Optional[torch.Tensor] = None,
                use_pe: bool = True, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.vit.patch_embed(images)  # (B, H, W, C) with dynamic_img_size
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        if use_pe:  # the official position-only ablation feeds its queries without it
            x = x + self.position_embedding((h, w))
        if keep is not None:
            x = x[:, keep]
        if self.prefix:
            x = torch.cat([self.vit.cls_token.expand(b, -1, -1), x], dim=1)
        if attn_mask is not None:  # the single-view ablation: (N, N) bool, True where a token may attend
            for block in self.vit.blocks:
                x = block(x, attn_mask=attn_mask)
        elif self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.vit.blocks, x)  # timm's: recompute each block in the backward pass
        else:
            x = self.vit.blocks(x)
        return self.vit.norm(x)


class ProjectionHead(nn.Module):
    """Linear-GELU-Linear-GELU-Linear, L2-normalised bottleneck, then bias-free prototypes normalised at every
    forward (weight norm with gain 1). Returns cosine similarities in [-1, 1]."""

    def __init__(self, width: int, hidden: int, bottleneck: int, num_prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        z = self.mlp(tokens)
        return z / z.norm(dim=-1, keepdim=True)  # the official code adds no epsilon here

    def cosines(self, z: torch.Tensor) -> torch.Tensor:
        protos = self.prototypes / (self.prototypes.norm(dim=-1, keepdim=True) + 1e-10)
        return z @ protos.t()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.cosines(self.embed(tokens))


class CrossAttentionBlock(nn.Module):
    """g: x <- x + MHA(q=LN_q(x), k=v=LN_kv(kv)); x <- x + MLP(LN(x)). No stochastic depth (official)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(width, eps=1e-6)
        self.norm_kv = nn.LayerNorm(width, eps=1e-6)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=get_act_layer(GELU_TANH))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if kv.shape[1] > 0:  # eta = 1 leaves no reference token: the attention term is zero
            d = c // self.heads
            q = self.q(self.norm_q(x)).reshape(b, n, self.heads, d).transpose(1, 2)
            k, v = self.kv(self.norm_kv(kv)).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
            attn = F.scaled_dot_product_attention(q, k, v)
            x = x + self.proj(attn.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class LOCA(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.encoder = Encoder(cfg)
        self.proj_head = ProjectionHead(m.width, m.head_hidden, m.head_bottleneck, m.num_prototypes)
        self.cross_block = CrossAttentionBlock(m.width, m.heads, m.mlp_ratio)
        self.final_norm = nn.LayerNorm(m.width, eps=1e-6)
        self.position_head = nn.Linear(m.width, cfg.num_reference_positions)
        lo = cfg.loss
        self.objective, self.localization, self.cluster_level = lo.objective, lo.localization, lo.cluster_level
        self.framework = lo.framework
        # Box-regression ablation (Tab. 1): (y, x, h, w) of the query in the reference, from its mean token.
        self.box_head = nn.Linear(m.width, 4) if lo.localization == "box" else None
        official_init_(self)

    def single_view_logits(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Fig. 2a, Zhai et al.: one view without position embedding, each token predicting its own position
        (B, N, N) with the position head; masked tokens attend only to the unmasked ones."""
        n = self.encoder.grid[0] * self.encoder.grid[1]
        return self.position_head(self.encoder(images, use_pe=False, attn_mask=single_view_mask(n, keep)))

    def position_logits(self, query_tokens: torch.Tensor, reference_tokens: torch.Tensor) -> torch.Tensor:
        return self.position_head(self.final_norm(self.cross_block(query_tokens, reference_tokens)))

    def forward(self, random_query: Optional[torch.Tensor], random_keep: Optional[torch.Tensor],
                focal_query: Optional[torch.Tensor], reference_tokens: Optional[torch.Tensor],
                reference: Optional[torch.Tensor] = None, reference_keep: Optional[torch.Tensor] = None):
        """The student's whole pass (one call, so DistributedDataParallel sees it): the random query
        (B, 3, S, S) with its kept token indices and the focal queries (B, Qf, 3, s, s), either may be None,
        attend to the visible reference tokens (B, kept, C). Returns the cluster cosines (B, M, K) and the
        position output of all M query tokens, random query first: logits (B, M, N_ref); with
        loss.localization=center one logit row per query (B, Q, N_ref), with box one box per query (B, Q, 4).
        An objective without clusters (positions) returns None in their place.

        loss.objective=position is the official localization-only path: the reference is encoded here, by
        the student with gradient, keeping only ``reference_keep`` tokens before the blocks, and the queries
        get no position embedding."""
        if self.framework == "single_view":
            return None, self.single_view_logits(reference, reference_keep)
        query_pe = self.objective != "position"
        p, c = self.encoder.prefix, self.encoder.width
        if self.objective == "position":
            reference_tokens = self.encoder(reference, keep=reference_keep)[:, p:]
        tokens, sizes, class_tokens = [], [], []
        if random_query is not None:
            out = self.encoder(random_query, keep=random_keep, use_pe=query_pe)
            class_tokens.append(out[:, :p])
            tokens.append(out[:, p:])
            sizes.append(tokens[-1].shape[1])
        if focal_query is not None:
            b, count = focal_query.shape[:2]
            out = self.encoder(focal_query.flatten(0, 1), use_pe=query_pe)
            class_tokens.append(out[:, :p].reshape(b, count * p, c))
            tokens.append(out[:, p:].reshape(b, -1, c))
            sizes += [tokens[-1].shape[1] // count] * count
        # The cross-attention is per query token, so all queries of an image attend to its reference at once.
        query_tokens = torch.cat(tokens, dim=1)
        clusters = None
        if self.objective != "position":
            if self.cluster_level == "patch":
                clusters = self.proj_head(query_tokens)                                     # (B, M, K)
            elif self.cluster_level == "cls":
                clusters = self.proj_head(torch.cat(class_tokens, dim=1))                   # (B, Q, K)
            else:  # gap: each query's mean patch token
                clusters = self.proj_head(torch.stack([t.mean(1) for t in query_tokens.split(sizes, 1)], 1))
        if self.objective == "cluster":
            return clusters, None
        if self.localization == "patches":
            return clusters, self.position_logits(query_tokens, reference_tokens)
        attended = self.final_norm(self.cross_block(query_tokens, reference_tokens))
        pooled = torch.stack([part.mean(1) for part in attended.split(sizes, dim=1)], 1)   # (B, Q, C)
        if self.localization == "center":
            return clusters, self.position_head(pooled)
        return clusters, self.box_head(pooled).sigmoid()


def single_view_mask(num_tokens: int, keep: torch.Tensor) -> torch.Tensor:
    """Zhai et al.'s masking in one view: every token attends only to the unmasked ones (``keep``); with none
    unmasked (eta = 1) each token sees only itself."""
    allowed = torch.zeros(num_tokens, dtype=torch.bool, device=keep.device)
    allowed[keep] = True
    if not allowed.any():
        return torch.eye(num_tokens, dtype=torch.bool, device=keep.device)
    return allowed.expand(num_tokens, num_tokens).clone()


def _xavier_blocks_(weight: torch.Tensor, blocks: int) -> None:
    """Xavier-uniform init of a fused projection, each (out/blocks x in) block on its own, as Flax initialises
    separate q, k and v kernels."""
    for chunk in weight.chunk(blocks, dim=0):
        nn.init.xavier_uniform_(chunk)


@torch.no_grad()
def official_init_(model: LOCA) -> None:
    """The official initialisation (official-implementation.md §7 item 23)."""
    vit = model.encoder.vit
    lecun_normal_(vit.patch_embed.proj.weight)
    nn.init.zeros_(vit.patch_embed.proj.bias)
    nn.init.normal_(vit.pos_embed, std=1.0 / math.sqrt(vit.embed_dim))
    if vit.cls_token is not None:
        nn.init.normal_(vit.cls_token, std=1e-6)  # timm's init (the official code has no class token)
    for blk in vit.blocks:
        _xavier_blocks_(blk.attn.qkv.weight, 3)
        nn.init.zeros_(blk.attn.qkv.bias)
        nn.init.xavier_uniform_(blk.attn.proj.weight)
        nn.init.zeros_(blk.attn.proj.bias)
        for fc in (blk.mlp.fc1, blk.mlp.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)
    g = model.cross_block
    nn.init.xavier_uniform_(g.q.weight)
    _xavier_blocks_(g.kv.weight, 2)
    nn.init.xavier_uniform_(g.proj.weight)
    for lin in (g.q, g.kv, g.proj):
        nn.init.zeros_(lin.bias)
    for fc in (g.mlp.fc1, g.mlp.fc2):
        nn.init.xavier_uniform_(fc.weight)
        nn.init.normal_(fc.bias, std=1e-6)
    heads = [model.position_head] + ([model.box_head] if model.box_head is not None else [])
    for layer in list(model.proj_head.mlp) + heads:
        if isinstance(layer, nn.Linear):
            lecun_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
    protos = model.proj_head.prototypes
    lecun_normal_(protos)
    protos.div_(protos.norm(dim=-1, keepdim=True) + 1e-10)
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
