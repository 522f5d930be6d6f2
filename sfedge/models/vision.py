"""Oryx-ViT vision encoder (SigLIP-so400m layout), timm-style parameter names.

Input: normalized pixels [N, 3, H, W] (H = W = frame size). Output: [N, patches, width], the last
block's tokens (no CLS token, no final norm, no pooling head).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sfedge.config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # [N, P, C]


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on [B, P, d] tensors, as bmm -> softmax -> bmm with the scale folded into q.

    What ``F.scaled_dot_product_attention`` computes without a mask, written with ops XNNPACK takes whole
    (the decomposed SDPA adds eq / where / logical_not / expand_copy on [heads, P, P] for its mask
    handling, which ExecuTorch runs in portable kernels outside the delegate)."""
    scores = torch.bmm(q * (q.shape[-1] ** -0.5), k.transpose(1, 2))
    return torch.bmm(torch.softmax(scores, dim=-1), v)


class ViTAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=True)
        self.proj = nn.Linear(config.width, config.width, bias=True)
        self.explicit = False  # True: the delegate-friendly graph for export (see use_export_graph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit:
            return self._forward_explicit(x)
        n, p, c = x.shape
        qkv = self.qkv(x).reshape(n, p, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, p, c))

    def _forward_explicit(self, x: torch.Tensor) -> torch.Tensor:
        n, p, c = x.shape
        h, d = self.heads, c // self.heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # [N, P, C] -> [N*H, P, d]
            return t.reshape(n, p, h, d).permute(0, 2, 1, 3).reshape(n * h, p, d)

        qkv = self.qkv(x)
        q, k, v = (heads(qkv[..., i * c:(i + 1) * c]) for i in range(3))  # slice_copy (delegated), not split/select
        out = explicit_attention(q, k, v).reshape(n, h, p, d).permute(0, 2, 1, 3).reshape(n, p, c)
        return self.proj(out)


class ExplicitLayerNorm(nn.Module):
    """nn.LayerNorm over the last dim from mean / sub / mul / rsqrt (XNNPACK has no layer_norm; its mean
    takes 4D inputs over dims (2, 3) only, hence the trailing unit dim). Shares the LayerNorm's parameters."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x4 = x.reshape(*x.shape, 1)  # [N, P, C, 1] (view_copy: squeeze/unsqueeze_copy are not all delegated)
        centered = x4 - x4.mean(dim=(2, 3), keepdim=True)
        variance = (centered * centered).mean(dim=(2, 3), keepdim=True)
        normed = (centered * torch.rsqrt(variance + self.eps)).reshape(x.shape)
        return normed * self.weight + self.bias


class ViTMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.width)
        self.gelu_dtype: torch.dtype | None = None  # e.g. float32 under a float16 export: XNNPACK has no fp16 GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if self.gelu_dtype is not None and hidden.dtype != self.gelu_dtype:
            return self.fc2(F.gelu(hidden.to(self.gelu_dtype)).to(hidden.dtype))
        return self.fc2(F.gelu(hidden))  # exact (erf) GELU


class ViTBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = ViTAttention(config)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = ViTMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def resize_position_grid(pos_embed: torch.Tensor, source_grid: int, target_grid: int) -> torch.Tensor:
    """[1, G*G, C] learned grid -> [1, g*g, C], bilinear with align_corners=False (Oryx)."""
    if source_grid == target_grid:
        return pos_embed
    c = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, source_grid, source_grid, c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(target_grid, target_grid), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, target_grid * target_grid, c).to(pos_embed.dtype)


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.pos_grid * config.pos_grid, config.width))
        self.blocks = nn.ModuleList(ViTBlock(config) for _ in range(config.depth))
        # The grid resized to the frame size, computed once after the weights are in place.
        self.register_buffer("frame_pos_embed", torch.zeros(1, config.patches_per_frame, config.width), persistent=False)

    @torch.no_grad()
    def bake_position_embedding(self) -> None:
        """Resize the learned grid once for the configured frame size (call after loading weights)."""
        resized = resize_position_grid(self.pos_embed.detach(), self.config.pos_grid, self.config.grid)
        self.frame_pos_embed = resized.clone().to(self.pos_embed.dtype)

    def use_export_graph(self) -> None:
        """Switch to the graph the exporters trace: explicit attention and layer norms built from ops every
        backend delegates. Same function (fp32 max abs ~1e-6 from reassociation); eager runs keep SDPA."""
        for block in self.blocks:
            block.attn.explicit = True
            for name in ("norm1", "norm2"):
                norm = getattr(block, name)
                if isinstance(norm, nn.LayerNorm):
                    setattr(block, name, ExplicitLayerNorm(norm))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.frame_pos_embed
        for block in self.blocks:
            x = block(x)
        return x
