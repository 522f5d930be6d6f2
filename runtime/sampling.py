"""Next-token choice: greedy by default, temperature + top-p (nucleus) with a seeded generator."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from sfedge.errors import UsageError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: Optional[int] = None

    def validate(self) -> "SamplingConfig":
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        return self


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config.validate()
        self.generator = torch.Generator()
        if config.seed is not None:
            self.generator.manual_seed(config.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.config.temperature == 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.config.temperature, dim=-1)
        if self.config.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < self.config.top_p
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=self.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self.generator))
