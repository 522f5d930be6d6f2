"""The ONNX decoder's KV cache, one class per ``kv_layout`` of the export (docs/onnx.md).

A cache binds the decoder's past inputs and present outputs on an ``IOBinding``, takes the outputs
of a run (``advance``), moves back to an earlier position (``rewind``) and copies positions out of or
into the cache (``save`` / ``load``, names ``layer{i}.key`` / ``layer{i}.value``).

``gqa-inplace``: numpy buffers [1, kv_heads, max_context, head_dim] wrapped as OrtValues without a copy
(``ortvalue_from_numpy`` shares host memory), bound as both past and present: GroupQueryAttention
sees the same pointer and writes only the new rows. Rewinding is bookkeeping: the graph attends to
``attention_mask``'s length, and the next call overwrites the stale rows.
``past-present``: the presents of one call are bound as the next call's pasts.
``prefix-inplace``: numpy buffers [1, max_context, kv_heads, head_dim] (position-major); a call binds the
contiguous view of its first ``start + T`` rows as both past and present, the graph's ScatterND writes the
T new rows into it.
"""
from __future__ import annotations

import abc
from typing import Dict, List, Mapping

import numpy as np
import torch

from sfedge.config import LLMConfig
from sfedge.errors import SfedgeError
from sfedge.registry import Registry

GQA_INPLACE, PAST_PRESENT, PREFIX_INPLACE = "gqa-inplace", "past-present", "prefix-inplace"


def kv_name(layer: int, kind: str) -> str:
    return f"layer{layer}.{kind}"


class KVCache(abc.ABC):
    layout: str = ""

    def __init__(self, past_names: List[str], present_names: List[str], llm: LLMConfig, max_context: int,
                 dtype, device: str):
        import onnxruntime

        self._ort = onnxruntime
        self.past_names, self.present_names = past_names, present_names
        self.kv_heads, self.head_dim, self.max_context = llm.kv_heads, llm.head_dim, max_context
        self.dtype, self.device = dtype, device
        # past_names are past_key_values.{i}.key / .value in layer order
        self.keys = [kv_name(i // 2, "key" if i % 2 == 0 else "value") for i in range(len(past_names))]
        self.length = 0
        self.reset()

    @abc.abstractmethod
    def reset(self) -> None:
        """An empty cache (length 0)."""

    @abc.abstractmethod
    def bind(self, binding, total: int) -> None:
        """Bind every past input and present output of the next run, which ends at position ``total``."""

    @abc.abstractmethod
    def advance(self, presents: list, length: int) -> None:
        """Take the run's present outputs; the cache now holds ``length`` positions."""

    @abc.abstractmethod
    def rewind(self, start_pos: int) -> None:
        """Forget the positions from ``start_pos`` on (``start_pos <= length``)."""

    @abc.abstractmethod
    def arrays(self) -> List[np.ndarray]:
        """The cache tensors [1, kv_heads, >= length, head_dim], in ``past_names`` order."""

    @abc.abstractmethod
    def load(self, tensors: Mapping[str, torch.Tensor], length: int) -> None:
        """Replace the cache by ``length`` positions of ``tensors`` (named as ``save`` names them)."""

    def save(self, length: int) -> Dict[str, torch.Tensor]:
        if not 0 <= length <= self.length:
            raise SfedgeError(f"save_kv({length}): the cache holds {self.length} positions")
        return {name: torch.from_numpy(np.array(array[:, :, :length])) for name, array in zip(self.keys, self.arrays())}

    def _checked(self, tensors: Mapping[str, torch.Tensor], length: int) -> List[np.ndarray]:
        if not 0 <= length <= self.max_context:
            raise SfedgeError(f"load_kv: length {length} is outside the exported context of {self.max_context}")
        missing = [name for name in self.keys if name not in tensors]
        if missing:
            raise SfedgeError(f"load_kv: the saved cache has no {', '.join(missing[:3])}; it was saved from another model")
        expected = (1, self.kv_heads, self.head_dim)
        out = []
        for name in self.keys:
            array = tensors[name].detach().cpu().numpy()
            if array.ndim != 4 or (array.shape[0], array.shape[1], array.shape[3]) != expected or array.shape[2] < length:
                raise SfedgeError(f"load_kv: {name} has shape {tuple(array.shape)}, expected [1, {self.kv_heads}, "
                                  f">= {length}, {self.head_dim}]")
            out.append(np.ascontiguousarray(array[:, :, :length], dtype=self.dtype))
        return out


class InplaceCache(KVCache):
    layout = GQA_INPLACE

    def reset(self) -> None:
        shape = (1, self.kv_heads, self.max_context, self.head_dim)
        if not getattr(self, "buffers", None):
            self.buffers = [np.zeros(shape, dtype=self.dtype) for _ in self.past_names]
            self.values = [self._ort.OrtValue.ortvalue_from_numpy(b) for b in self.buffers]  # shares the memory
        self.length = 0  # stale rows are never read: attention stops at the mask's length

    def bind(self, binding, total: int) -> None:
        for past, present, value in zip(self.past_names, self.present_names, self.values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def advance(self, presents: list, length: int) -> None:
        self.length = length  # written in place

    def rewind(self, start_pos: int) -> None:
        self.length = start_pos

    def arrays(self) -> List[np.ndarray]:
        return self.buffers

    def load(self, tensors: Mapping[str, torch.Tensor], length: int) -> None:
        for buffer, array in zip(self.buffers, self._checked(tensors, length)):
            buffer[:, :, :length] = array
        self.length = length


class PastPresentCache(KVCache):
    layout = PAST_PRESENT

    def _set(self, arrays: List[np.ndarray], length: int) -> None:
        self.past = [self._ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        self.length = length

    def reset(self) -> None:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        self._set([empty] * len(self.past_names), 0)

    def bind(self, binding, total: int) -> None:
        for name, value in zip(self.past_names, self.past):
            binding.bind_ortvalue_input(name, value)
        for name in self.present_names:
            binding.bind_output(name, self.device)  # ORT allocates; kept as the next call's past

    def advance(self, presents: list, length: int) -> None:
        self.past, self.length = list(presents), length

    def rewind(self, start_pos: int) -> None:
        if start_pos == self.length:
            return
        if start_pos == 0:
            self.reset()
            return
        self._set([np.ascontiguousarray(a[:, :, :start_pos]) for a in self.arrays()], start_pos)

    def arrays(self) -> List[np.ndarray]:
        return [value.numpy() for value in self.past]

    def load(self, tensors: Mapping[str, torch.Tensor], length: int) -> None:
        self._set(self._checked(tensors, length), length)


class PrefixCache(InplaceCache):  # written in place too: advance / rewind only move the length
    layout = PREFIX_INPLACE

    def reset(self) -> None:
        if not getattr(self, "buffers", None):
            shape = (1, self.max_context, self.kv_heads, self.head_dim)
            self.buffers = [np.zeros(shape, dtype=self.dtype) for _ in self.past_names]
        self.length = 0

    def bind(self, binding, total: int) -> None:
        for past, present, buffer in zip(self.past_names, self.present_names, self.buffers):
            value = self._ort.OrtValue.ortvalue_from_numpy(buffer[:, :total])  # a view of the first rows: no copy
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def arrays(self) -> List[np.ndarray]:
        return [buffer.transpose(0, 2, 1, 3) for buffer in self.buffers]  # views [1, kv_heads, max_context, head_dim]

    def load(self, tensors: Mapping[str, torch.Tensor], length: int) -> None:
        for buffer, array in zip(self.buffers, self._checked(tensors, length)):
            buffer[:, :length] = array.transpose(0, 2, 1, 3)
        self.length = length


CACHES: Registry = Registry("ONNX decoder kv_layout")
CACHES.add(GQA_INPLACE, InplaceCache)
CACHES.add(PAST_PRESENT, PastPresentCache)
CACHES.add(PREFIX_INPLACE, PrefixCache)


def open_cache(decoder_extra: Mapping[str, object], llm: LLMConfig, max_context: int, dtype, device: str) -> KVCache:
    """The cache of the decoder entry's ``kv_layout``. Exports made before the layout was recorded
    (their ``kv_layout`` holds the shape description) are past-present."""
    layout = str(decoder_extra.get("kv_layout", PAST_PRESENT))
    layout = layout if layout in CACHES else PAST_PRESENT
    return CACHES.get(layout)(list(decoder_extra["past_inputs"]), list(decoder_extra["present_outputs"]), llm,
                              max_context, dtype, device)
