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


class ViTAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=True)
        self.proj = nn.Linear(config.width, config.width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, c = x.shape
        qkv = self.qkv(x).reshape(n, p, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, p, c))


class ViTMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


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

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.frame_pos_embed
        for block in self.blocks:
            x = block(x)
        return x
