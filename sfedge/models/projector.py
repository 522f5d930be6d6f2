"""SlowFast projector: mlp2x_gelu + slow pathway (few frames, light pooling) + fast pathway.

Input: vision features [T, P, C_vision]. Output: [slow tokens of the slow frames in time order,
then fast tokens of all frames in time order, no separators] as [visual_tokens, H_llm].
Frame count T is fixed at construction (the exported artifact has a static shape).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sfedge.config import SlowFastConfig


class SlowFastProjector(nn.Module):
    def __init__(self, config: SlowFastConfig, vision_width: int, llm_hidden: int, grid: int):
        super().__init__()
        self.config = config
        self.grid = grid
        # Parameter names follow LLaVA's mm_projector (mlp2x_gelu): 0 = Linear, 1 = GELU, 2 = Linear.
        self.mlp = nn.Sequential(nn.Linear(vision_width, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))

    def visual_tokens(self, frames: int) -> int:
        slow = self.config.effective_slow_frames(frames) * self.config.slow_tokens_per_frame(self.grid)
        return slow + frames * self.config.fast_tokens_per_frame()

    def _slow(self, x: torch.Tensor) -> torch.Tensor:
        t, p, d = x.shape
        pool, k = self.config.slow_pool, self.config.slow_kernel
        if pool == "concat":
            return x.reshape(t * p, d)
        if pool.startswith("spatial_1d"):  # along the row-major token axis, per frame
            seq = x.transpose(1, 2)  # [t, d, p]
            seq = F.max_pool1d(seq, k, k) if pool.endswith("max_pool") else F.avg_pool1d(seq, k, k)
            return seq.transpose(1, 2).reshape(-1, d)
        img = x.transpose(1, 2).reshape(t, d, self.grid, self.grid)
        img = F.max_pool2d(img, k, k) if pool.endswith("max_pool") else F.avg_pool2d(img, k, k)
        return img.flatten(2).transpose(1, 2).reshape(-1, d)

    def _fast(self, x: torch.Tensor) -> torch.Tensor:
        t, p, d = x.shape
        img = x.transpose(1, 2).reshape(t, d, self.grid, self.grid)
        gh, gw = self.config.fast_grid
        if self.grid % gh == 0 and self.grid % gw == 0:  # equal to adaptive pooling, friendlier to export
            img = F.avg_pool2d(img, (self.grid // gh, self.grid // gw))
        else:
            img = F.adaptive_avg_pool2d(img, (gh, gw))
        return img.flatten(2).transpose(1, 2).reshape(-1, d)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        frames = features.shape[0]
        if self.config.mlp_before_pool:
            features = self.mlp(features)
        slow_index = torch.tensor(self.config.slow_indices(frames), dtype=torch.long)
        tokens = torch.cat([self._slow(features[slow_index]), self._fast(features)], dim=0)
        return tokens if self.config.mlp_before_pool else self.mlp(tokens)
