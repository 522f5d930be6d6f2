"""The eager PyTorch model as a session: the reference every exported backend is checked against."""
from __future__ import annotations

from pathlib import Path

import torch

from sfedge.config import ModelConfig
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


SESSIONS.add("eager", EagerSession)
