"""The eager PyTorch model as a session: the reference every exported backend is checked against."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from sfedge.config import ModelConfig
from sfedge.errors import SfedgeError
from sfedge.manifest import Manifest
from sfedge.models import SFLlava, WeightsSource, build_model
from sfedge.runtime.sessions.base import SESSIONS, ModelSession, SessionOptions


class EagerSession(ModelSession):
    backend = "eager"

    def __init__(self, model: SFLlava, manifest: Manifest | None = None):
        self.model = model
        self.config: ModelConfig = model.config
        self.manifest = manifest
        self.max_context = model.text_decoder.max_seq_len
        self.max_prefill_chunk = self.max_context

    @classmethod
    def build(cls, config: ModelConfig, weights: WeightsSource = WeightsSource(), max_context: int | None = None,
              dtype: torch.dtype = torch.float32) -> "EagerSession":
        return cls(build_model(config, weights, max_context, dtype))

    @classmethod
    def open(cls, folder: Path, manifest: Manifest, options: SessionOptions) -> "EagerSession":
        """The eager model behind an artifact folder, rebuilt from its manifest's weights source."""
        config = ModelConfig.from_dict(manifest.model_config)
        weights = WeightsSource.from_dict(manifest.weights)
        return cls(build_model(config, weights, int(manifest.export_options["max_context"])), manifest)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision_encoder(pixels)

    @torch.inference_mode()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.projector(features)

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(token_ids[None])[0]

    @torch.inference_mode()
    def decode(self, embeds: torch.Tensor, start_pos: int) -> torch.Tensor:
        logits = self.model.text_decoder(embeds[None], torch.tensor([start_pos], dtype=torch.long))
        return logits[0].float()

    def reset(self) -> None:
        self.model.text_decoder.reset_cache()

    def _caches(self):
        return [layer.self_attn.attend.cache for layer in self.model.text_decoder.layers]

    def save_kv(self, length: int) -> Dict[str, torch.Tensor]:
        """The KVCache buffers [1, max_seq_len, kv_heads, head_dim] of positions < length, as [1, kv_heads, length, head_dim]."""
        tensors = {}
        for i, cache in enumerate(self._caches()):
            tensors[f"layer{i}.key"] = cache.k_cache[:, :length].transpose(1, 2).contiguous().clone()
            tensors[f"layer{i}.value"] = cache.v_cache[:, :length].transpose(1, 2).contiguous().clone()
        return tensors

    def load_kv(self, tensors: Dict[str, torch.Tensor], length: int) -> None:
        caches = self._caches()
        expected = {f"layer{i}.{kind}" for i in range(len(caches)) for kind in ("key", "value")}
        if set(tensors) != expected or length > self.max_context:
            raise SfedgeError(f"the saved KV cache has {len(tensors)} tensors for {length} positions; this eager model "
                              f"needs {len(expected)} tensors and holds {self.max_context} positions")
        self.reset()
        with torch.inference_mode():
            for i, cache in enumerate(caches):
                for kind, buffer in (("key", cache.k_cache), ("value", cache.v_cache)):
                    value = tensors[f"layer{i}.{kind}"]
                    if tuple(value.shape) != (1, buffer.shape[2], length, buffer.shape[3]):
                        raise SfedgeError(f"saved KV tensor layer{i}.{kind} has shape {tuple(value.shape)}, this model "
                                          f"expects {(1, buffer.shape[2], length, buffer.shape[3])}")
                    buffer[:, :length] = value.transpose(1, 2).to(buffer.dtype)


SESSIONS.add("eager", EagerSession)
