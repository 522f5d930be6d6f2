"""ONNX Runtime session over an artifact folder written by ``sfedge export --backend onnx``.

Reads only the manifest and the .onnx files. The decoder graph is stateless (explicit past/present
key-values, see docs/onnx.md), so the session keeps the present tensors of one call as OrtValues and
binds them as the past of the next with IO binding: the cache never round-trips through numpy. The
graph's Concat still writes a new [past + T] tensor per layer each step (ONNX has no in-place update
outside ORT's contrib GroupQueryAttention).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from sfedge.config import ModelConfig
from sfedge.errors import SfedgeError
from sfedge.manifest import Component, Manifest, artifact_path
from sfedge.runtime.sessions.base import SESSIONS, ModelSession, SessionOptions

DEFAULT_PROVIDER = "CPUExecutionProvider"
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def _ort():
    try:
        import onnxruntime
    except ModuleNotFoundError:
        raise SfedgeError("the onnx runtime needs onnxruntime, which is not installed: pip install 'sfedge[onnx]'") from None
    return onnxruntime


class _Graph:
    """One InferenceSession plus the numpy dtype each input wants."""

    def __init__(self, path: Path, session_options, providers: List[str]):
        ort = _ort()
        try:
            self.session = ort.InferenceSession(str(path), session_options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise SfedgeError(f"ONNX Runtime could not load {path}: {str(exc).splitlines()[0]}") from None
        self.input_types = {i.name: _NUMPY_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def feed(self, name: str, value: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(value, dtype=self.input_types[name])

    def run(self, **inputs: np.ndarray) -> List[np.ndarray]:
        return self.session.run(None, {name: self.feed(name, value) for name, value in inputs.items()})


def _projector_key(frames: int) -> str:
    return f"{Component.PROJECTOR.value}[{frames}]"


class OnnxRuntimeSession(ModelSession):
    backend = "onnx"

    def __init__(self, graphs: Dict[str, _Graph], manifest: Manifest, device: str):
        self.graphs = graphs
        self.manifest = manifest
        self.config = ModelConfig.from_dict(manifest.model_config)
        options = manifest.export_options
        self.max_context = int(options["max_context"])
        self.max_prefill_chunk = int(options["prefill_chunk"])
        self.frame_counts = tuple(manifest.projectors())
        self.frames = self.frame_counts[0]
        self.encoder_batch = int(options["encoder_batch"])  # the graph's batch is dynamic: this bounds memory
        decoder = manifest.component(Component.TEXT_DECODER)
        self._past_names: List[str] = list(decoder.extra["past_inputs"])
        self._present_names: List[str] = list(decoder.extra["present_outputs"])
        self._decoder = graphs[Component.TEXT_DECODER.value]
        self._device = device
        self._ort = _ort()
        self._past: List = []
        self._past_len = 0
        self.reset()

    @classmethod
    def open(cls, folder: Path, manifest: Manifest, options: SessionOptions) -> "OnnxRuntimeSession":
        ort = _ort()
        provider = options.provider or DEFAULT_PROVIDER
        available = ort.get_available_providers()
        if provider not in available:
            raise SfedgeError(f"ONNX Runtime execution provider {provider!r} is not available in this onnxruntime "
                              f"build; available: {', '.join(available)}")
        providers = [provider] if provider == DEFAULT_PROVIDER else [provider, DEFAULT_PROVIDER]
        session_options = ort.SessionOptions()
        if options.threads:
            session_options.intra_op_num_threads = int(options.threads)
        graphs = {entry.component: _Graph(artifact_path(folder, entry.file), session_options, providers)
                  for entry in manifest.components if entry.component != Component.PROJECTOR.value}
        graphs.update({_projector_key(frames): _Graph(artifact_path(folder, entry.file), session_options, providers)
                       for frames, entry in manifest.projectors().items()})
        missing = {c.value for c in Component if c != Component.PROJECTOR} - set(graphs)
        if missing:
            raise SfedgeError(f"{folder}: the manifest lists no file for {', '.join(sorted(missing))}; re-export the model")
        device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        return cls(graphs, manifest, device)

    # --- the four components ----------------------------------------------------------------------

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        (features,) = self.graphs[Component.VISION_ENCODER.value].run(pixel_values=pixels.numpy())
        return torch.from_numpy(features).float()

    def project(self, features: torch.Tensor) -> torch.Tensor:
        self.check_frames(features.shape[0])
        (visual,) = self.graphs[_projector_key(features.shape[0])].run(image_features=features.numpy())
        return torch.from_numpy(visual).float()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        (embeds,) = self.graphs[Component.TOKEN_EMBEDDING.value].run(input_ids=token_ids.reshape(1, -1).numpy())
        return torch.from_numpy(embeds[0]).float()

    def decode(self, embeds: torch.Tensor, start_pos: int) -> torch.Tensor:
        tokens = embeds.shape[0]
        if tokens < 1 or tokens > self.max_prefill_chunk:
            raise SfedgeError(f"decode takes 1..{self.max_prefill_chunk} tokens per call (the export's --prefill-chunk), "
                              f"got {tokens}: feed longer prompts in chunks (sfedge.runtime.generate.prefill)")
        if start_pos + tokens > self.max_context:
            raise SfedgeError(f"positions {start_pos}..{start_pos + tokens - 1} do not fit the exported context of "
                              f"{self.max_context}: re-export with a larger --max-context")
        self._rewind(start_pos)
        graph = self._decoder
        binding = graph.session.io_binding()
        binding.bind_cpu_input("inputs_embeds", graph.feed("inputs_embeds", embeds.numpy()[None]))
        binding.bind_cpu_input("attention_mask", np.ones((1, start_pos + tokens), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.arange(start_pos, start_pos + tokens, dtype=np.int64)[None])
        for name, value in zip(self._past_names, self._past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")  # copied back to the host below
        for name in self._present_names:
            binding.bind_output(name, self._device)  # ORT allocates; kept as the next call's past
        graph.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self._past = list(outputs[1:])
        self._past_len = start_pos + tokens
        return torch.from_numpy(outputs[0].numpy()[0, -1]).float()

    def _rewind(self, start_pos: int) -> None:
        """Position ``start_pos`` must follow the cached tokens; an earlier one truncates the cache."""
        if start_pos == self._past_len:
            return
        if start_pos == 0:
            self.reset()
            return
        if start_pos > self._past_len:
            raise SfedgeError(f"decode at position {start_pos} but the cache holds {self._past_len} tokens: "
                              f"positions must be contiguous (call reset() to start over)")
        self._past = [self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :start_pos]))
                      for v in self._past]
        self._past_len = start_pos

    def reset(self) -> None:
        llm = self.config.llm
        dtype = self._decoder.input_types[self._past_names[0]]
        empty = np.zeros((1, llm.kv_heads, 0, llm.head_dim), dtype=dtype)
        self._past = [self._ort.OrtValue.ortvalue_from_numpy(empty) for _ in self._past_names]
        self._past_len = 0

    def close(self) -> None:
        self.graphs.clear()
        self._past = []


SESSIONS.add("onnx", OnnxRuntimeSession)
