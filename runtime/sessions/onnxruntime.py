"""ONNX Runtime session over an artifact folder written by ``sfedge export --backend onnx``.

Reads only the manifest and the .onnx files. The decoder graph is stateless (explicit past/present
key-values, see docs/onnx.md); how the session carries the cache between calls depends on the
decoder's ``kv_layout`` (sfedge.runtime.sessions.onnx_kv):

- ``gqa-inplace``: one [1, kv_heads, max_context, head_dim] buffer per layer and kind, bound as both the
  past input and the present output of GroupQueryAttention, which writes only the new rows;
- ``past-present``: the present tensors of one call are bound as the past of the next (the graph's
  Concat writes a new [past + T] tensor per layer each step);
- ``prefix-inplace``: one [1, max_context, kv_heads, head_dim] buffer per layer and kind, whose first
  start + T rows (a contiguous view) are bound as both past and present: ScatterND writes the new rows.

A decoder entry with a decode graph (manifest ``extra.decode_graph``, recipe int8-channel-q4decode) opens two
decoder sessions with identical inputs and outputs: calls of T > 1 tokens run the entry's file, calls of one token
the decode graph; the same cache buffers are bound to whichever runs, so the two graphs share one KV cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from sfedge.config import ModelConfig
from sfedge.errors import SfedgeError
from sfedge.manifest import Component, Manifest, artifact_path, decode_graph
from sfedge.memory import release_free_heap
from sfedge.runtime.sessions.base import SESSIONS, ModelSession, SessionOptions
from sfedge.runtime.sessions.onnx_kv import KVCache, open_cache

DEFAULT_PROVIDER = "CPUExecutionProvider"
# Graphs that run once per frame or once per video: without ONNX Runtime's CPU arena their buffers go back to
# the OS after each call instead of staying reserved (grown by doubling) for the rest of the process, i.e.
# under the LLM's prefill. The decoder and the embedding keep the arena: they run every chunk and token.
NO_ARENA = frozenset({Component.VISION_ENCODER.value, Component.PROJECTOR.value})
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


def session_options(ort, options: SessionOptions, component: str):
    """The ORT SessionOptions of one component's graph (threads; the CPU arena per NO_ARENA)."""
    session_options = ort.SessionOptions()
    if options.threads:
        session_options.intra_op_num_threads = int(options.threads)
    session_options.enable_cpu_mem_arena = component not in NO_ARENA
    return session_options


def _projector_key(frames: int) -> str:
    return f"{Component.PROJECTOR.value}[{frames}]"


DECODE_GRAPH_KEY = f"{Component.TEXT_DECODER.value}[decode]"  # the T = 1 graph of a two-graph decoder


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
        self._decoder = graphs[Component.TEXT_DECODER.value]
        self._step_decoder = graphs.get(DECODE_GRAPH_KEY, self._decoder)  # runs the T = 1 calls
        self._device = device
        decoder = manifest.component(Component.TEXT_DECODER)
        dtype = self._decoder.input_types[decoder.extra["past_inputs"][0]]
        if self._step_decoder.input_types != self._decoder.input_types or \
                self._step_decoder.output_names != self._decoder.output_names:
            raise SfedgeError(f"the decode graph {decode_graph(decoder).file} does not take the inputs and outputs of "
                              f"{decoder.file}: the two cannot share a KV cache; re-export the model")
        self._cache: KVCache = open_cache(decoder.extra, self.config.llm, self.max_context, dtype, device)
        self.kv_layout = self._cache.layout

    @classmethod
    def open(cls, folder: Path, manifest: Manifest, options: SessionOptions) -> "OnnxRuntimeSession":
        ort = _ort()
        provider = options.provider or DEFAULT_PROVIDER
        available = ort.get_available_providers()
        if provider not in available:
            raise SfedgeError(f"ONNX Runtime execution provider {provider!r} is not available in this onnxruntime "
                              f"build; available: {', '.join(available)}")
        providers = [provider] if provider == DEFAULT_PROVIDER else [provider, DEFAULT_PROVIDER]
        graphs = {entry.component: _Graph(artifact_path(folder, entry.file), session_options(ort, options, entry.component),
                                          providers)
                  for entry in manifest.components if entry.component != Component.PROJECTOR.value}
        step = decode_graph(manifest.component(Component.TEXT_DECODER))
        if step is not None:
            graphs[DECODE_GRAPH_KEY] = _Graph(artifact_path(folder, step.file, "decode graph"),
                                              session_options(ort, options, Component.TEXT_DECODER.value), providers)
        graphs.update({_projector_key(frames): _Graph(artifact_path(folder, entry.file),
                                                      session_options(ort, options, Component.PROJECTOR.value), providers)
                       for frames, entry in manifest.projectors().items()})
        release_free_heap()  # the model protos and pre-packing copies freed while loading: back to the OS
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
        if start_pos > self._cache.length:
            raise SfedgeError(f"decode at position {start_pos} but the cache holds {self._cache.length} tokens: "
                              f"positions must be contiguous (call reset() to start over)")
        self._cache.rewind(start_pos)  # an earlier start position overwrites from there on
        graph = self._step_decoder if tokens == 1 else self._decoder
        binding = graph.session.io_binding()
        binding.bind_cpu_input("inputs_embeds", graph.feed("inputs_embeds", embeds.numpy()[None]))
        binding.bind_cpu_input("attention_mask", np.ones((1, start_pos + tokens), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.arange(start_pos, start_pos + tokens, dtype=np.int64)[None])
        binding.bind_output("logits")  # copied back to the host below
        self._cache.bind(binding, start_pos + tokens)
        graph.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self._cache.advance(outputs[1:], start_pos + tokens)
        return torch.from_numpy(outputs[0].numpy()[0, -1]).float()

    def save_kv(self, length: int) -> Dict[str, torch.Tensor]:
        """The first ``length`` cached positions of every layer: ``layer{i}.key`` / ``layer{i}.value``
        [1, kv_heads, length, head_dim] (copies)."""
        return self._cache.save(length)

    def load_kv(self, tensors: Dict[str, torch.Tensor], length: int) -> None:
        """Replace the cache by ``length`` positions saved with ``save_kv``; decoding goes on at ``length``."""
        self._cache.load(tensors, length)

    def reset(self) -> None:
        self._cache.reset()

    def close(self) -> None:
        self.graphs.clear()
        self._cache.reset()


SESSIONS.add("onnx", OnnxRuntimeSession)
