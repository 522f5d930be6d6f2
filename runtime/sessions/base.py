"""One interface over every backend: the four components as calls on torch tensors.

A session owns its KV cache. ``decode(embeds[T, H], start_pos)`` appends T tokens at positions
``start_pos .. start_pos + T - 1`` and returns the logits of the last one; T may be as large as
``max_prefill_chunk`` (prefill) or 1 (decode). ``reset()`` forgets the cache.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from sfedge.config import ModelConfig
from sfedge.errors import SfedgeError
from sfedge.manifest import Manifest
from sfedge.registry import Registry


@dataclass(frozen=True)
class SessionOptions:
    """Typed options shared by all backends; each backend reads the ones it knows."""

    verify: bool = True  # check artifact sha256 against the manifest
    threads: Optional[int] = None
    provider: Optional[str] = None  # ONNX Runtime execution provider


class ModelSession(abc.ABC):
    backend: str = ""
    config: ModelConfig
    manifest: Optional[Manifest] = None
    max_context: int  # KV cache length
    max_prefill_chunk: int  # the largest T decode() accepts
    frames: Optional[int] = None  # the export's default (static) frame count, None when any count works
    frame_counts: Tuple[int, ...] = ()  # every frame count a projector artifact takes; () when any count works
    encoder_batch: Optional[int] = None  # static batch of the vision encoder artifact, None when any batch works

    @abc.abstractmethod
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, S, S] normalized float32 -> features [N, patches, vision width]."""

    @abc.abstractmethod
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """features [T, patches, vision width] -> visual embeddings [visual tokens, hidden]."""

    @abc.abstractmethod
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token ids [T] int64 -> embeddings [T, hidden]."""

    @abc.abstractmethod
    def decode(self, embeds: torch.Tensor, start_pos: int) -> torch.Tensor:
        """embeds [T, hidden] at start_pos -> logits [vocab] of the last position (float32)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget the KV cache (a new conversation starts at position 0)."""

    def save_kv(self, length: int) -> Optional[Dict[str, torch.Tensor]]:
        """The KV cache of positions 0 .. length - 1 as named tensors (``layer{i}.key`` / ``layer{i}.value``,
        [1, kv_heads, length, head_dim]) so a video prefix can be kept on disk; None when the backend does not
        expose its cache (the caller then re-prefills the prefix)."""
        return None

    def load_kv(self, tensors: Dict[str, torch.Tensor], length: int) -> None:
        """Put tensors written by ``save_kv(length)`` back; the next ``decode`` starts at ``length``."""
        raise SfedgeError(f"the {self.backend} session cannot load a saved KV cache")

    def check_frames(self, frames: int, where: str = "") -> None:
        """A clear error when the artifacts have no projector for ``frames`` frames."""
        if self.frame_counts and frames not in self.frame_counts:
            counts = ",".join(str(f) for f in self.frame_counts)
            raise SfedgeError(f"{where or 'this ' + self.backend + ' export'} has projectors for {counts} frames, not {frames}: "
                              f"pass --frames with one of those, or re-export with `sfedge export --frames {counts},{frames}`")

    def load_for_video(self, frames: int) -> None:
        """Load now what a video question of ``frames`` frames runs (vision encoder, that projector, the LLM), so the
        first question's time to first token holds no loading. Backends that load every graph when opened have
        nothing left to do."""

    def close(self) -> None:  # pragma: no cover - backends with resources override
        pass


SessionFactory = type  # a ModelSession subclass with ``open(folder, manifest, options)``
SESSIONS: Registry = Registry("runtime backend")
