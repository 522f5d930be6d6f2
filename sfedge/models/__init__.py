"""The SF-LLaVA-1.5 model as four export-friendly components, and how to build it."""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import torch
from torch import nn

from sfedge.config import ModelConfig
from sfedge.models.hf_config import llm_config_from_hf
from sfedge.models.llm import TextDecoder, TokenEmbedding
from sfedge.models.llm_fill import LLMFiller, release_modules
from sfedge.models.projector import SlowFastProjector
from sfedge.models.vision import VisionEncoder
from sfedge.models.weights import (
    WeightsSource, load_local, map_projector_keys, map_vision_keys, random_state,
)

log = logging.getLogger(__name__)

COMPONENT_SEEDS = {"vision_encoder": 0, "projector": 1, "token_embedding": 2, "text_decoder": 3}


class SFLlava(nn.Module):
    """Container of the four components; each is exported on its own."""

    def __init__(self, config: ModelConfig, max_seq_len: int, cache_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.vision_encoder = VisionEncoder(config.vision)
        self.projector = SlowFastProjector(config.slowfast, config.vision.width, config.llm.hidden, config.vision.grid)
        self.token_embedding = TokenEmbedding(config.llm)
        self.text_decoder = TextDecoder(config.llm, max_seq_len, cache_dtype)


def resolve_config(config: ModelConfig, weights: WeightsSource) -> ModelConfig:
    """A local LLM folder's config.json is authoritative for the LLM shape."""
    if not weights.llm_dir:
        return config
    llm = llm_config_from_hf(weights.llm_dir, config.llm)
    if llm != config.llm:
        changed = [f.name for f in dataclasses.fields(llm) if getattr(llm, f.name) != getattr(config.llm, f.name)]
        log.info("LLM shape taken from %s/config.json (differs from preset %s in: %s)", weights.llm_dir, config.name, ", ".join(changed))
    return config.replace(llm=llm)


def build_model(config: ModelConfig, weights: WeightsSource = WeightsSource(), max_seq_len: int | None = None,
                dtype: torch.dtype = torch.float32, fill: bool = True) -> SFLlava:
    """Build on the meta device, then fill each component from its checkpoint or seeded random tensors
    (``fill=False``: leave every part empty, for a caller that fills them one at a time with ``fill_part``)."""
    model = empty_model(config, weights, max_seq_len)
    for part in PARTS if fill else ():
        fill_part(model, weights, part, dtype)
    return model.eval()


# What can be filled (and freed) on its own: the LLM is one part (Qwen2.5 ties the lm_head to the token embedding).
PARTS = ("vision_encoder", "projector", "llm")
PART_MODULES = {"vision_encoder": ("vision_encoder",), "projector": ("projector",), "llm": ("token_embedding", "text_decoder")}


def empty_model(config: ModelConfig, weights: WeightsSource = WeightsSource(), max_seq_len: int | None = None) -> SFLlava:
    """The model on the meta device (no memory): fill its parts with ``fill_part`` one at a time."""
    config = resolve_config(config, weights)
    with torch.device("meta"):
        return SFLlava(config, max_seq_len or config.llm.max_context).eval()


def part_is_empty(model: SFLlava, part: str) -> bool:
    return any(p.is_meta for name in PART_MODULES[part] for p in getattr(model, name).parameters())


def fill_part(model: SFLlava, weights: WeightsSource, part: str, dtype: torch.dtype = torch.float32,
              on_layer: Optional[Callable[[nn.Module], None]] = None) -> None:
    """Give one part (see PARTS) its weights and computed buffers: the same tensors ``build_model`` gives it.
    ``on_layer`` (part "llm"): called with each decoder layer as soon as it is filled."""
    config = model.config
    if part == "vision_encoder":
        _fill(model.vision_encoder, "vision_encoder", weights.vision_path, map_vision_keys, weights.seed, dtype)
        vision = model.vision_encoder
        vision.frame_pos_embed = torch.zeros(vision.frame_pos_embed.shape, dtype=vision.pos_embed.dtype)
        vision.bake_position_embedding()
    elif part == "projector":
        _fill(model.projector, "projector", weights.projector_path, map_projector_keys, weights.seed, dtype)
    elif part == "llm":
        _fill_llm(model, weights, dtype, on_layer)
        materialize_llm_buffers(model.text_decoder, config)
    else:
        raise ValueError(f"unknown model part {part!r}; known: {', '.join(PARTS)}")


def release_part(model: SFLlava, part: str) -> None:
    """Drop one part's weights and buffers (replaced by meta tensors of the same shape and dtype, quantized
    tensor subclasses included): their memory is freed once nothing else holds them."""
    for name in PART_MODULES[part]:
        release_modules(getattr(model, name))


def _generator(seed: int, component: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + COMPONENT_SEEDS[component])


def _fill(module: nn.Module, component: str, path, mapper, seed: int, dtype: torch.dtype) -> None:
    if path:
        load_local(module, path, component, mapper, dtype)
    else:
        module.load_state_dict(random_state(module, _generator(seed, component), dtype), assign=True)


def _fill_llm(model: SFLlava, weights: WeightsSource, dtype: torch.dtype,
              on_layer: Optional[Callable[[nn.Module], None]] = None) -> None:
    """The token embedding, then the decoder one layer at a time (``on_layer(layer)`` right after each, e.g.
    to quantize it before the next is filled), then its final norm and lm_head. The tensors are those of
    one pass over the whole decoder: the random stream and checkpoint names run in the same order."""
    filler = LLMFiller(model, weights, dtype)
    filler.fill_embedding()
    for index, layer in enumerate(model.text_decoder.layers):
        filler.fill_unit(index)
        if on_layer is not None:
            on_layer(layer)
    filler.fill_unit(filler.layers)
    filler.tie()


def materialize_llm_buffers(decoder: TextDecoder, config: ModelConfig) -> None:
    """Non-persistent buffers (RoPE tables, KV caches) are computed, not loaded."""
    from sfedge.models.llm import KVCache, rope_tables

    cos, sin = rope_tables(config.llm.head_dim, decoder.max_seq_len, config.llm.rope_theta)
    decoder.rope_cos, decoder.rope_sin = cos, sin
    for module in decoder.modules():
        if isinstance(module, KVCache):
            shape, dtype = module.k_cache.shape, module.k_cache.dtype
            module.k_cache = torch.zeros(shape, dtype=dtype)
            module.v_cache = torch.zeros(shape, dtype=dtype)


__all__ = ["SFLlava", "WeightsSource", "build_model", "empty_model", "fill_part", "release_part", "part_is_empty", "PARTS", "resolve_config", "LLMFiller", "materialize_llm_buffers", "VisionEncoder", "SlowFastProjector",
           "TokenEmbedding", "TextDecoder"]
