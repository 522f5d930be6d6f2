"""The LLM traced for ONNX without its float32 weights resident, and its weights written tensor by tensor.

Tracing the fp32 decoder used to hold the whole LLM (1B: 5.75 GiB; 3B: 11.5 GiB). Now every large matrix of the
token embedding and decoder is a *stand-in* while tracing: a tensor of the true shape and dtype whose rows all
view one row of ``arange(columns)`` (stride 0: a few KiB). ``torch.export`` and the ONNX translation only read
shapes; onnxscript's optimizer folds each linear weight's ``Transpose`` into a new initializer, which for a numpy
array is a view: a strided view of the stand-in. Small tensors (1-D norms and biases, matrices of at most
``STAND_IN_MAX_REAL`` values, which the optimizer may compare or fold by value) keep their real values.

After the trace every initializer backed by a stand-in (recognised by its data pointer; identity or transposed,
told apart by its strides) gets an ``onnx_ir.LazyTensor`` that produces the real tensor when the external-data
writer reaches it: the LLM's tensors are filled one unit (the embedding, a decoder layer, the final norm) at a
time into a scratch meta model with ``sfedge.models.LLMFiller``, so at most one unit is resident. The bytes
written are those the fp32 model would have written (test: initializers and nodes identical to a trace of the
filled model).
"""
from __future__ import annotations

import contextlib
import gc
import re
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import nn

from sfedge.errors import SfedgeError
from sfedge.models import LLMFiller, SFLlava, WeightsSource, materialize_llm_buffers, part_is_empty, release_part
from sfedge.models.llm_fill import release_modules

# onnx_ir's DeduplicateInitializersPass (run by the optimizer) merges initializers of at most 1,024 values with
# equal bytes: such tensors must be real for the graph to come out the same. Larger ones are only moved around.
STAND_IN_MAX_REAL = 1024
LLM_MODULES = ("token_embedding", "text_decoder")
_LAYER = re.compile(r"^text_decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class StandIn:
    name: str  # the real tensor's name in SFLlava (a tied lm_head is the token embedding)
    shape: Tuple[int, ...]
    tensor: torch.Tensor  # kept alive: its data pointer identifies it in the traced graph


def make_stand_in(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Rows of one ``arange`` row: strides (0, 1), so a transposed view has strides (1, 0)."""
    return torch.arange(shape[1], dtype=dtype).expand(shape)


class LLMWeights:
    """The LLM's stand-ins and the real tensors behind them."""

    def __init__(self, real: "RealTensors"):
        self.real = real
        self.stand_ins: Dict[int, StandIn] = {}  # data pointer -> stand-in

    def replace(self, module: nn.Module, prefix: str) -> None:
        """Swap ``module``'s large matrices for stand-ins (their real tensors are dropped with the swap); a
        parameter tied to two places within ``module`` gets one stand-in, named after its first place."""
        by_param: Dict[int, nn.Parameter] = {}  # id(real parameter) -> its stand-in (the parameters are alive here)
        for module_name, child in module.named_modules():
            for key, param in list(child._parameters.items()):
                if (param is None or param.is_meta or param.dim() != 2 or param.numel() <= STAND_IN_MAX_REAL
                        or param.data_ptr() in self.stand_ins):
                    continue
                stand_in = by_param.get(id(param))
                if stand_in is None:
                    stand_in = nn.Parameter(make_stand_in(param.shape, param.dtype), requires_grad=False)
                    name = ".".join(part for part in (prefix, module_name, key) if part)
                    self.stand_ins[stand_in.data_ptr()] = StandIn(name, tuple(param.shape), stand_in)
                    by_param[id(param)] = stand_in
                child._parameters[key] = stand_in

    def bind(self, graph) -> int:
        """Give every initializer of ``graph`` (an onnx_ir Graph) that views a stand-in a lazy real tensor;
        returns how many. An initializer that views a stand-in in any other way than as is or transposed fails."""
        import onnx_ir as ir

        bound = 0
        for value in graph.initializers.values():
            tensor = value.const_value
            layout = _layout(tensor)
            if layout is None or layout[0] not in self.stand_ins:
                continue
            stand_in = self.stand_ins[layout[0]]
            transposed = _transposed(value.name, tensor, layout[1], stand_in)
            value.const_value = ir.LazyTensor(
                partial(self._real_tensor, stand_in.name, transposed, tensor.name), tensor.dtype, tensor.shape,
                name=tensor.name, doc_string=tensor.doc_string, metadata_props=dict(tensor.metadata_props))
            bound += 1
        return bound

    def _real_tensor(self, name: str, transposed: bool, tensor_name: Optional[str]):
        import onnx_ir as ir

        array = self.real.get(name).numpy()
        return ir.Tensor(np.ascontiguousarray(array.T if transposed else array), name=tensor_name)

    def drop_cache(self) -> None:
        self.real.drop_cache()


def _layout(tensor) -> Optional[Tuple[int, Tuple[int, ...]]]:
    """(data pointer, byte strides) of an in-memory tensor's array; None for other tensor kinds."""
    raw = getattr(tensor, "raw", None)
    if isinstance(raw, torch.Tensor) and not raw.is_meta:
        return raw.data_ptr(), tuple(stride * raw.element_size() for stride in raw.stride())
    if isinstance(raw, np.ndarray):
        return raw.__array_interface__["data"][0], tuple(raw.strides)
    return None


def _transposed(initializer: str, tensor, strides: Tuple[int, ...], stand_in: StandIn) -> bool:
    shape = tuple(tensor.shape)
    itemsize = stand_in.tensor.element_size()
    if shape == stand_in.shape and strides == (0, itemsize):
        return False
    if shape == stand_in.shape[::-1] and strides == (itemsize, 0):
        return True
    raise SfedgeError(f"ONNX initializer {initializer!r} {list(shape)} derives from {stand_in.name} "
                      f"{list(stand_in.shape)} other than as is or transposed (strides {strides}): "
                      "the weight-free trace cannot write it")


class RealTensors:
    """The real tensors by SFLlava name, one unit at a time."""

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def drop_cache(self) -> None:
        pass


class FilledTensors(RealTensors):
    """Fills a scratch meta model unit by unit (``LLMFiller``): only the unit of the last tensor asked is resident."""

    def __init__(self, model: SFLlava, weights: WeightsSource):
        with torch.device("meta"):
            self.scratch = SFLlava(model.config, model.text_decoder.max_seq_len)
        self.filler = LLMFiller(self.scratch, weights)
        self._unit: Optional[object] = None

    def get(self, name: str) -> torch.Tensor:
        unit = self._unit_of(name)
        if unit != self._unit:
            self.drop_cache()
            if unit == "embedding":
                self.filler.fill_embedding()
            else:
                self.filler.fill_unit(unit)
            self._unit = unit
        return self.scratch.get_parameter(name).detach()

    def _unit_of(self, name: str):
        if name.startswith("token_embedding."):
            return "embedding"
        match = _LAYER.match(name)
        return int(match.group(1)) if match else self.filler.layers

    def drop_cache(self) -> None:
        if self._unit is not None:
            release_modules(self.scratch.token_embedding if self._unit == "embedding" else self.filler.unit_module(self._unit))
            self._unit = None
            gc.collect()


class HeldTensors(RealTensors):
    """A model built whole: its own tensors (nothing to save by refilling)."""

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        self.tensors = tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


@contextlib.contextmanager
def llm_with_stand_ins(model: SFLlava, weights: Optional[WeightsSource], progress) -> Iterator[LLMWeights]:
    """Within the block the LLM part holds stand-ins for its large matrices and real small tensors and buffers.
    ``weights``: where an empty (meta) LLM's weights come from (filled one unit at a time, each unit's large
    matrices swapped for stand-ins as soon as it is filled); None when the model was built whole. The part is
    released on exit."""
    with progress.stage("llm", "build"):  # large matrices as stand-ins
        if weights is not None and part_is_empty(model, "llm"):
            llm = LLMWeights(FilledTensors(model, weights))
            filler = LLMFiller(model, weights)
            filler.fill_embedding()
            llm.replace(model.token_embedding, "token_embedding")
            for index in range(filler.layers + 1):
                filler.fill_unit(index)
                llm.replace(filler.unit_module(index), "text_decoder")
            filler.tie()
            materialize_llm_buffers(model.text_decoder, model.config)
        else:
            held = {f"{prefix}.{name}": param.detach() for prefix in LLM_MODULES
                    for name, param in getattr(model, prefix).named_parameters()}
            llm = LLMWeights(HeldTensors(held))
            both = nn.Module()  # one pass over both modules: the tied lm_head gets the embedding's stand-in
            for prefix in LLM_MODULES:
                setattr(both, prefix, getattr(model, prefix))
            llm.replace(both, "")
    try:
        yield llm
    finally:
        llm.drop_cache()
        release_part(model, "llm")
        gc.collect()
