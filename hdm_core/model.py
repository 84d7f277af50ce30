"""XUT: the U-shaped transformer with cross-attention skips that predicts flow-matching velocity (spec §1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import XUTConfig
from .layers import (
    BlockModulations,
    PatchEmbed,
    TimestepEmbedding,
    TransformerBlock,
    UnPatch,
    modulation,
    shared_adaln,
)
from .rope import position_map, resize_position_map
from .tread import gather_tokens, make_route, scatter_tokens


def _block(cfg: XUTConfig, *, cross: bool = False) -> TransformerBlock:
    return TransformerBlock(cfg.dim, cfg.heads, cfg.head_dim, cfg.mlp_dim, cross=cross)


class _Runner(nn.Module):
    """Calls blocks directly or through activation checkpointing (spec §6: per block, non-reentrant)."""

    gradient_checkpointing: bool = False

    def _run(
        self,
        block: TransformerBlock,
        x: Tensor,
        pos: Tensor,
        mods: BlockModulations,
        skip: Tensor | None = None,
        out_rows: int | None = None,
    ) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, pos, mods, skip, out_rows, use_reentrant=False)
        return block(x, pos, mods, skip, out_rows)


class BlockStack(_Runner):
    """The full-sequence blocks before and after TREAD routing (`prev_tread_trns`, `post_tread_trns`)."""

    def __init__(self, cfg: XUTConfig, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_block(cfg) for _ in range(depth)])

    def forward(self, x: Tensor, pos: Tensor, mods: BlockModulations, out_rows: int | None = None) -> Tensor:
        """x [B, L, D], pos [B, L, 2] -> [B, L, D]; with out_rows the last block returns [B, out_rows, D]."""
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = self._run(block, x, pos, mods, None, out_rows if i == last else None)
        return x


class XUBackbone(_Runner):
    """`depth` encoder stages, then `depth` decoder stages whose first block cross-attends to an encoder output.

    skip_source "last": every decoder stage reads the last encoder stage (the released weights, spec §1.6);
    "mirrored": decoder stage d reads encoder stage depth-1-d (the paper's description).
    """

    def __init__(self, cfg: XUTConfig) -> None:
        super().__init__()
        self.skip_source = cfg.skip_source
        self.enc_blocks = nn.ModuleList(
            nn.ModuleList(_block(cfg) for _ in range(cfg.enc_blocks)) for _ in range(cfg.depth)
        )
        self.dec_blocks = nn.ModuleList(
            nn.ModuleList(_block(cfg, cross=j == 0) for j in range(cfg.dec_blocks)) for _ in range(cfg.depth)
        )

    def forward(self, x: Tensor, pos: Tensor, mods: BlockModulations) -> Tensor:
        """x [B, L, D], pos [B, L, 2] -> [B, L, D]."""
        skips = []
        for stage in self.enc_blocks:
            for block in stage:
                x = self._run(block, x, pos, mods)
            skips.append(x)
        depth = len(self.dec_blocks)
        for d, stage in enumerate(self.dec_blocks):
            skip = skips[-1] if self.skip_source == "last" else skips[depth - 1 - d]
            for block in stage:
                x = self._run(block, x, pos, mods, skip if block.has_cross else None)
        return x


class XUT(nn.Module):
    """Predicts the velocity v = eps - x0 for a noisy latent; objectives and samplers wrap it."""

    def __init__(self, config: XUTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.in_patch = PatchEmbed(config.in_channels, d, config.patch_size)
        self.time_emb = TimestepEmbedding(d)
        self.shared_adaln_attn = shared_adaln(d)
        self.shared_adaln_xattn = shared_adaln(d)
        self.shared_adaln_ffw = shared_adaln(d)
        self.ctx_proj = nn.Linear(config.ctx_dim, d)
        if config.addon_dim:
            self.addon_info_embs_proj = nn.Sequential(
                nn.Linear(config.addon_dim, d), nn.Mish(), nn.Linear(d, d)
            )
            nn.init.zeros_(self.addon_info_embs_proj[2].weight)
            nn.init.zeros_(self.addon_info_embs_proj[2].bias)
        else:
            self.addon_info_embs_proj = None
        self.prev_tread_trns = BlockStack(config, config.tread_pre)
        self.backbone = XUBackbone(config)
        self.post_tread_trns = BlockStack(config, config.tread_post)
        self.out_patch = UnPatch(d, config.patch_size, config.out_channels)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for module in (self.prev_tread_trns, self.backbone, self.post_tread_trns):
            module.gradient_checkpointing = enabled

    def _tread_rate(self, tread_rate: float | None) -> float:
        # 0 or None means no routing at inference; training routes at the configured rate unless told (spec §3,
        # deliberately not copying the reference's `tread_rate or dropout_ratio`).
        if tread_rate is None:
            return self.config.tread_rate if self.training else 0.0
        if not 0.0 <= tread_rate < 1.0:
            raise ValueError(f"tread_rate must be in [0, 1), got {tread_rate}")
        return float(tread_rate)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        ctx: Tensor | None,
        *,
        pos_map: Tensor | None = None,
        addon_info: Tensor | None = None,
        tread_rate: float | None = None,
        route_generators: Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Velocity for latent x at time t.

        x [B, C, H, W]; t [B] in [0, 1] (1 = noise); ctx [B, T, ctx_dim] or None (then ctx_size zero tokens);
        pos_map [B, H*W, 2] at latent resolution or None (exact patch centres); addon_info [B] = ln(W/H).
        Returns [B, C, H, W].
        """
        cfg = self.config
        b, _, h, w = x.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} must be divisible by patch_size {p}")
        gh, gw = h // p, w // p
        dtype = self.in_patch.proj.weight.dtype

        t_emb = self.time_emb(t.to(x.device).expand(b) if t.ndim == 0 else t)  # (B, 1, D)
        if self.addon_info_embs_proj is not None and addon_info is not None:
            addon = addon_info.reshape(b, -1).to(dtype)
            t_emb = t_emb + self.addon_info_embs_proj(addon)[:, None, :]
        mods = BlockModulations(
            modulation(self.shared_adaln_attn, t_emb),
            modulation(self.shared_adaln_xattn, t_emb),
            modulation(self.shared_adaln_ffw, t_emb),
        )

        tokens = self.in_patch(x.to(dtype))  # (B, N, D)
        n_img = tokens.shape[1]
        if ctx is None:
            ctx = tokens.new_zeros(b, cfg.ctx_size, cfg.ctx_dim)
        txt = self.ctx_proj(ctx.to(dtype))  # (B, T, D)
        if pos_map is None:
            img_pos = position_map(gh, gw, dtype=torch.float32, device=x.device).expand(b, -1, -1)
        else:
            if pos_map.shape != (b, h * w, 2):
                raise ValueError(
                    f"pos_map must be [B, H*W, 2] = {[b, h * w, 2]} at latent resolution, "
                    f"got {list(pos_map.shape)}"
                )
            shared = b > 1 and pos_map.stride(0) == 0  # one map for the whole batch (the pipeline's)
            img_pos = resize_position_map((pos_map[:1] if shared else pos_map).float(), (h, w), (gh, gw))
            img_pos = img_pos.expand(b, -1, -1) if shared else img_pos
        # Text tokens sit at (0, 0): RoPE leaves them unrotated (spec §1.2 step 5). One map for the whole batch stays
        # a broadcast view, so RoPE computes the rotations of one row.
        rows = 1 if img_pos.stride(0) == 0 else b
        pos = torch.cat([img_pos[:rows], img_pos.new_zeros(rows, txt.shape[1], 2)], dim=1).expand(b, -1, -1)
        seq = torch.cat([tokens, txt], dim=1)  # (B, N+T, D)

        seq = self.prev_tread_trns(seq, pos, mods)
        rate = self._tread_rate(tread_rate)
        if rate > 0:
            route = make_route(b, n_img, txt.shape[1], rate, device=x.device, generators=route_generators)
            routed = self.backbone(gather_tokens(seq, route), gather_tokens(pos, route), mods)
            seq = scatter_tokens(seq, routed, route)
        else:
            seq = self.backbone(seq, pos, mods)
        # Only image tokens reach the output head: the last block computes no text-token outputs.
        seq = self.post_tread_trns(seq, pos, mods, out_rows=n_img)
        return self.out_patch(seq[:, :n_img], (gh, gw))


def count_parameters(config: XUTConfig) -> int:
    """Parameter count, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = XUT(config)
    return sum(p.numel() for p in model.parameters())
