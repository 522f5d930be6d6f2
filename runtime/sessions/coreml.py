"""Core ML session: runs a ``--backend coreml`` folder with coremltools' prediction API (macOS 15+).

Written against coremltools' documented API: ``ct.models.MLModel(path, function_name=...)`` opens
one function of the multifunction ``llm.mlpackage``, ``make_state()`` creates the KV-cache states,
and ``predict(inputs, state=...)`` runs a step that reads and updates them. One state object serves
both ``prefill`` and ``decode`` (they declare the same states). Every input is padded to the
package's static shape: a prompt chunk shorter than ``prefill_chunk`` is zero-padded and
``last_index`` picks the last real row's logits.

Core ML prediction exists only on macOS: on any other OS ``open`` raises a one-line SfedgeError that
says so and how to export the same model for this machine. This module never imports sfedge.export.
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from sfedge.config import ModelConfig
from sfedge.errors import SfedgeError
from sfedge.manifest import Component, Manifest, artifact_path
from sfedge.runtime.sessions.base import SESSIONS, ModelSession, SessionOptions

MIN_MACOS = (15, 0)  # MLState (the KV cache) needs macOS 15 / iOS 18


def _macos_version() -> tuple:
    release = platform.mac_ver()[0]
    return tuple(int(p) for p in release.split(".")[:2]) if release else (0, 0)


def alternative_export(manifest: Manifest, backend: str = "executorch") -> str:
    """The command that exports the same model for a backend this machine runs."""
    counts = manifest.export_options.get("frame_counts") or [manifest.export_options.get("frames")]
    frames = ",".join(str(f) for f in counts if f)
    return (f"sfedge export --backend {backend} --model {manifest.preset}{f' --frames {frames}' if frames else ''} "
            f"--max-context {manifest.export_options.get('max_context')} --out <folder>")


def require_macos(manifest: Manifest) -> None:
    """Raise the one-line explanation when this machine cannot run Core ML predictions."""
    alternative = alternative_export(manifest)
    if sys.platform != "darwin":
        raise SfedgeError(f"Core ML prediction needs macOS 15+ (this is {platform.system() or sys.platform}); "
                          f"to run this model here export it for another backend: `{alternative}`")
    if _macos_version() < MIN_MACOS:
        raise SfedgeError(f"Core ML stateful prediction needs macOS 15+ (this is macOS {platform.mac_ver()[0]}); "
                          f"upgrade, or export for another backend: `{alternative}`")


class CoreMLSession(ModelSession):
    backend = "coreml"

    def __init__(self, models: Dict[str, object], manifest: Manifest):
        self.models = models
        self.manifest = manifest
        self.config = ModelConfig.from_dict(manifest.model_config)
        self.max_context = int(manifest.export_options["max_context"])
        decoder = manifest.component(Component.TEXT_DECODER)
        self.max_prefill_chunk = int(decoder.extra["prefill_chunk"])
        self.frame_counts = tuple(manifest.projectors())
        self.frames = self.frame_counts[0]
        self.encoder_batch = int(manifest.component(Component.VISION_ENCODER).inputs[0].shape[0])
        self.state = models["decode"].make_state()

    @classmethod
    def open(cls, folder: Path, manifest: Manifest, options: SessionOptions) -> "CoreMLSession":
        require_macos(manifest)
        try:
            import coremltools as ct
        except ModuleNotFoundError:
            raise SfedgeError("the Core ML runtime needs coremltools: pip install 'sfedge[coreml]'") from None
        folder = Path(folder)
        known_units = [u.name for u in ct.ComputeUnit]
        if options.provider and options.provider not in known_units:
            raise SfedgeError(f"unknown Core ML compute units {options.provider!r}; known: {', '.join(known_units)}")
        units = ct.ComputeUnit[options.provider] if options.provider else ct.ComputeUnit.ALL

        def load(component: Component, function: str | None = None):
            path = str(artifact_path(folder, manifest.component(component).file))
            if function:
                return ct.models.MLModel(path, compute_units=units, function_name=function)
            return ct.models.MLModel(path, compute_units=units)

        decoder = manifest.component(Component.TEXT_DECODER)
        models = {
            "vision_encoder": load(Component.VISION_ENCODER),
            **{f"projector[{frames}]": ct.models.MLModel(str(artifact_path(folder, entry.file)), compute_units=units)
               for frames, entry in manifest.projectors().items()},
            "embed": load(Component.TOKEN_EMBEDDING, manifest.component(Component.TOKEN_EMBEDDING).method),
            "prefill": load(Component.TEXT_DECODER, decoder.method),
            "decode": load(Component.TEXT_DECODER, decoder.extra["decode_function"]),
        }
        return cls(models, manifest)

    @staticmethod
    def _f16(x: torch.Tensor) -> np.ndarray:
        return x.detach().to(torch.float16).numpy()

    def _predict(self, name: str, inputs: dict, state=None) -> torch.Tensor:
        outputs = self.models[name].predict(inputs, state=state) if state is not None else self.models[name].predict(inputs)
        return torch.from_numpy(np.asarray(next(iter(outputs.values())))).float()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        batch = self.encoder_batch
        chunks = []
        for start in range(0, pixels.shape[0], batch):
            part = pixels[start:start + batch]
            padded = torch.zeros((batch, *part.shape[1:]), dtype=part.dtype)
            padded[: part.shape[0]] = part
            chunks.append(self._predict("vision_encoder", {"pixels": self._f16(padded)})[: part.shape[0]])
        return torch.cat(chunks)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        self.check_frames(features.shape[0])
        return self._predict(f"projector[{features.shape[0]}]", {"features": self._f16(features)})

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        chunk = self.max_prefill_chunk
        rows = []
        for start in range(0, token_ids.shape[0], chunk):
            part = token_ids[start:start + chunk]
            ids = np.zeros((1, chunk), dtype=np.int32)
            ids[0, : part.shape[0]] = part.numpy().astype(np.int32)
            rows.append(self._predict("embed", {"token_ids": ids})[0, : part.shape[0]])
        return torch.cat(rows)

    def decode(self, embeds: torch.Tensor, start_pos: int) -> torch.Tensor:
        tokens = embeds.shape[0]
        if tokens > self.max_prefill_chunk or start_pos + tokens > self.max_context:
            raise SfedgeError(f"decode got {tokens} tokens at position {start_pos}; this export takes at most "
                              f"{self.max_prefill_chunk} per call and {self.max_context} in total")
        name, width = ("decode", 1) if tokens == 1 else ("prefill", self.max_prefill_chunk)
        padded = torch.zeros((1, width, embeds.shape[1]))
        padded[0, :tokens] = embeds
        inputs = {"inputs_embeds": self._f16(padded), "input_pos": np.array([start_pos], dtype=np.int32),
                  "last_index": np.array([tokens - 1], dtype=np.int32)}
        return self._predict(name, inputs, state=self.state)[0]

    def reset(self) -> None:
        self.state = self.models["decode"].make_state()


SESSIONS.add("coreml", CoreMLSession)
