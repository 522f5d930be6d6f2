"""The LLM's weights one unit at a time: the token embedding, each decoder layer, then the rest (final norm and an
untied lm_head), with the tensors of one pass over the whole LLM (what ``fill_part(model, weights, "llm")`` gives).

Random weights come from one generator stream over the decoder; the filler remembers the stream's state at the
start of every unit it has filled, so a unit can be filled again, in any order, with the same tensors (a
caller that writes the weights tensor by tensor refills one layer at a time instead of holding them all).
Checkpoint weights are read from the memory-mapped safetensors, in any order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

import torch
from torch import nn

from sfedge.models.weights import (
    RANDOM_LOGIT_STD, WeightsSource, _safetensors_files, assign_state, map_llm_keys, random_state, read_safetensors,
)


class LLMFiller:
    """Fills ``model``'s token embedding and decoder units in place (units: layers 0 .. L-1, then L = the rest)."""

    def __init__(self, model: nn.Module, weights: WeightsSource, dtype: torch.dtype = torch.float32):
        from sfedge.models import _generator

        self.model, self.dtype = model, dtype
        self.layers = model.config.llm.layers
        self.tied = model.config.llm.tie_embeddings
        self._generator: torch.Generator | None = None
        self._states: Dict[int, torch.Tensor] = {}
        self._next = 0
        if weights.llm_dir:
            embedding_entries, decoder_entries = map_llm_keys(
                read_safetensors(_safetensors_files(Path(weights.llm_dir), "LLM")))
            self._fill_embedding: Callable[[], None] = lambda: assign_state(
                model.token_embedding, embedding_entries, dtype, "LLM")
            self._fill: Callable[[nn.Module], None] = lambda view: assign_state(view, decoder_entries, dtype, "LLM")
        else:
            embed_std = RANDOM_LOGIT_STD / model.config.llm.hidden ** 0.5
            self._fill_embedding = lambda: model.token_embedding.load_state_dict(
                random_state(model.token_embedding, _generator(weights.seed, "token_embedding"), dtype, embed_std),
                assign=True)
            self._generator = _generator(weights.seed, "text_decoder")
            self._states[0] = self._generator.get_state()
            self._fill = lambda view: view.load_state_dict(random_state(view, self._generator, dtype), strict=False,
                                                           assign=True)

    def fill_embedding(self) -> None:
        self._fill_embedding()

    def unit_module(self, index: int) -> nn.Module:
        """A view holding unit ``index``'s modules under their decoder names (``layers.{i}.*``; ``norm``, ``lm_head``)."""
        decoder = self.model.text_decoder
        view = nn.Module()
        if index < self.layers:
            view.layers = nn.ModuleDict({str(index): decoder.layers[index]})
        elif index == self.layers:
            view.norm = decoder.norm
            if not self.tied:  # a tied lm_head is the embedding (and the last tensor of the random stream: nothing after it shifts)
                view.lm_head = decoder.lm_head
        else:
            raise IndexError(f"decoder unit {index} out of range 0..{self.layers}")
        return view

    def fill_unit(self, index: int) -> None:
        """Fill decoder unit ``index`` (the same tensors whichever units were filled before)."""
        self._seek(index)
        self._fill(self.unit_module(index))
        self._next = index + 1
        if self._generator is not None:
            self._states.setdefault(self._next, self._generator.get_state())

    def tie(self) -> None:
        if self.tied:
            self.model.text_decoder.lm_head.weight = self.model.token_embedding.embed_tokens.weight

    def _seek(self, index: int) -> None:
        """Put the random stream at the start of unit ``index``, drawing (and dropping) the units before it if needed."""
        if self._generator is None or index == self._next:
            return
        start = max(known for known in self._states if known <= index)
        self._generator.set_state(self._states[start])
        self._next = start
        while self._next < index:
            skipped = self.unit_module(self._next)
            self._fill(skipped)
            release_modules(skipped)
            self._next += 1
            self._states.setdefault(self._next, self._generator.get_state())


def release_modules(module: nn.Module) -> None:
    """Replace every parameter and buffer of ``module`` by a meta tensor of the same shape and dtype (quantized
    tensor subclasses included): their memory is freed once nothing else holds them."""
    for child in module.modules():
        for key, param in list(child._parameters.items()):
            if param is not None:
                child._parameters[key] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                      requires_grad=False)
        for key, buffer in list(child._buffers.items()):
            if buffer is not None:
                child._buffers[key] = torch.empty(buffer.shape, dtype=buffer.dtype, device="meta")
