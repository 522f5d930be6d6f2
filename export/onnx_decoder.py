"""The text decoder with explicit past/present key-values, for ONNX, in one of two KV layouts.

The eager ``TextDecoder`` keeps a static KV cache inside each layer's ``self_attn.attend``
(``CachedAttention``). ONNX graphs are stateless, so while exporting we swap every ``attend`` for a
layout's attention module that takes the layer's past k/v as graph inputs and hands ``present`` back
as graph outputs. The layers, norms, RoPE tables and lm_head are the eager model's own modules.

    inputs_embeds [1, T, H], attention_mask [1, start + T], position_ids [1, T],
    past_key_values.N.key / .value [1, kv_heads, P, head_dim]
    -> logits [1, 1, V] (last position only), present.N.key / .value [1, kv_heads, P', head_dim]

``gqa-inplace`` (default): ORT's ``com.microsoft.GroupQueryAttention`` per layer
(sfedge.export.onnx_gqa); P = P' = the buffer length (max_context), and the runtime binds one buffer
per layer as both past and present, so a step writes only its T new rows.
``past-present`` (transformers.js's merged decoder, for the web): Concat of past and new;
P = start, P' = start + T, a fresh present tensor per step.
``prefix-inplace``: position-major k/v ``[1, P, kv_heads, head_dim]`` with P = P' = start + T: the runtime
binds the first start + T rows of one max_context buffer per layer (a contiguous view) as past and
present; ``ScatterND`` writes the T new rows in place and standard-op attention reads the view
(sfedge.export.onnx_prefix: a decode step reads each cached row once, where ORT's CPU
GroupQueryAttention reads it once per query head).

One graph serves prefill (past = 0) and decode (T = 1).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sfedge.config import LLMConfig
from sfedge.export import onnx_gqa, onnx_prefix
from sfedge.models.llm import TextDecoder

GQA_INPLACE, PAST_PRESENT, PREFIX_INPLACE = "gqa-inplace", "past-present", "prefix-inplace"
DEFAULT_KV_LAYOUT = GQA_INPLACE

INPUT_NAMES = ("inputs_embeds", "attention_mask", "position_ids")
LOGITS = "logits"


def past_names(layers: int) -> List[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> List[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


class PastPresentAttention(nn.Module):
    """Stands in for ``CachedAttention``: attends over ``past + new`` k/v instead of a cache buffer.

    The wrapper hands each layer its past with ``bind(...)`` before calling the layer and reads
    ``present`` afterwards (the layer's own forward signature stays untouched).
    """

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.groups = config.heads // config.kv_heads
        self.past: Tuple[torch.Tensor, torch.Tensor] | None = None
        self.present: Tuple[torch.Tensor, torch.Tensor] | None = None

    def bind(self, past_key: torch.Tensor, past_value: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.past, self.present = (past_key, past_value), None

    def forward(self, q, k, v, positions, start_pos, mask):  # q [1,T,H,D], k/v [1,T,Hkv,D], mask [T, past+T]
        past_key, past_value = self.past
        key = torch.cat([past_key, k.transpose(1, 2).to(past_key.dtype)], dim=2)  # [1, Hkv, past+T, D]
        value = torch.cat([past_value, v.transpose(1, 2).to(past_value.dtype)], dim=2)
        self.present = (key, value)
        q = q.transpose(1, 2)
        key = key.to(q.dtype).repeat_interleave(self.groups, dim=1)
        value = value.to(q.dtype).repeat_interleave(self.groups, dim=1)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask[None, None])
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class GroupQueryAttention(nn.Module):
    """Stands in for ``CachedAttention``: one ``GroupQueryAttention`` node over a max-length buffer."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.heads, self.kv_heads = config.heads, config.kv_heads
        self.past: Tuple[torch.Tensor, torch.Tensor] | None = None
        self.attention_mask: torch.Tensor | None = None
        self.present: Tuple[torch.Tensor, torch.Tensor] | None = None

    def bind(self, past_key: torch.Tensor, past_value: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.past, self.attention_mask, self.present = (past_key, past_value), attention_mask, None

    def forward(self, q, k, v, positions, start_pos, mask):  # q [1,T,H,D], k/v [1,T,Hkv,D]; RoPE applied
        batch, tokens = q.shape[:2]
        past_key, past_value = self.past
        out, present_key, present_value = onnx_gqa.group_query_attention(
            q.reshape(batch, tokens, -1), k.reshape(batch, tokens, -1), v.reshape(batch, tokens, -1),
            past_key, past_value, self.attention_mask, self.heads, self.kv_heads)
        self.present = (present_key, present_value)
        return out


class PrefixAttention(GroupQueryAttention):
    """Stands in for ``CachedAttention``: ScatterND into a position-major [1, start + T, Hkv, D] view plus
    standard-op attention (sfedge.export.onnx_prefix)."""

    def forward(self, q, k, v, positions, start_pos, mask):  # q [1,T,H,D], k/v [1,T,Hkv,D]; RoPE applied
        batch, tokens = q.shape[:2]
        past_key, past_value = self.past
        out, present_key, present_value = onnx_prefix.prefix_attention(
            q.reshape(batch, tokens, -1), k.reshape(batch, tokens, -1), v.reshape(batch, tokens, -1),
            past_key, past_value, mask, self.heads, self.kv_heads, q.shape[-1])
        self.present = (present_key, present_value)
        return out


# layout -> the attention module swapped into every layer while tracing
ATTENTIONS: Dict[str, Callable[[LLMConfig], nn.Module]] = {GQA_INPLACE: GroupQueryAttention,
                                                           PAST_PRESENT: PastPresentAttention,
                                                           PREFIX_INPLACE: PrefixAttention}


class PastPresentDecoder(nn.Module):
    """A functional forward over the eager decoder's modules (layers, norm, lm_head, RoPE tables)."""

    def __init__(self, decoder: TextDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values):
        decoder = self.decoder
        positions = position_ids[0]
        cos, sin = decoder.rope_cos[positions], decoder.rope_sin[positions]
        total = attention_mask.shape[1]
        # key j (absolute position j) is visible to query i when j <= position_i and the mask keeps it
        mask = (torch.arange(total, dtype=positions.dtype)[None, :] <= positions[:, None]) & attention_mask[0].bool()[None, :]
        x = inputs_embeds
        presents = []
        for layer, (past_key, past_value) in zip(decoder.layers, past_key_values):
            attend = layer.self_attn.attend
            attend.bind(past_key, past_value, attention_mask)
            x = layer(x, cos, sin, positions, positions[:1], mask)
            presents.extend(attend.present)
        logits = decoder.lm_head(decoder.norm(x[:, -1:, :]))
        return (logits, *presents)


def check_layout(layout: str) -> str:
    if layout not in ATTENTIONS:
        from sfedge.errors import UsageError

        raise UsageError(f"--kv-layout {layout!r} is unknown; known: {', '.join(ATTENTIONS)}")
    return layout


@contextlib.contextmanager
def export_attention(decoder: TextDecoder, layout: str = DEFAULT_KV_LAYOUT) -> Iterator[PastPresentDecoder]:
    """Swap every layer's ``attend`` for the layout's attention; the originals come back on exit."""
    originals = [layer.self_attn.attend for layer in decoder.layers]
    attention = ATTENTIONS[check_layout(layout)]
    try:
        for layer in decoder.layers:
            layer.self_attn.attend = attention(decoder.config)
        yield PastPresentDecoder(decoder).eval()
    finally:
        for layer, attend in zip(decoder.layers, originals):
            layer.self_attn.attend = attend


def example_inputs(decoder: TextDecoder, layout: str = DEFAULT_KV_LAYOUT, tokens: int = 3, past: int = 2) -> tuple:
    """Trace inputs; sizes > 1 keep torch.export from specialising the dynamic dimensions (the GQA
    buffer is longer than past + T, as at run time)."""
    config = decoder.config
    dtype = decoder.lm_head.weight.dtype
    buffer = {GQA_INPLACE: past + tokens + 4, PREFIX_INPLACE: past + tokens}.get(layout, past)
    kv_shape = tuple(kv_dims(layout, config.kv_heads, buffer, config.head_dim))
    past_kv = [(torch.zeros(kv_shape, dtype=dtype), torch.zeros(kv_shape, dtype=dtype)) for _ in range(config.layers)]
    return (torch.zeros(1, tokens, config.hidden, dtype=dtype), torch.ones(1, past + tokens, dtype=torch.long),
            torch.arange(past, past + tokens)[None], past_kv)


def kv_dims(layout: str, kv_heads, length, head_dim, batch=1) -> list:
    """One past/present tensor's shape: [1, kv_heads, length, head_dim], position-major for prefix-inplace."""
    return [batch, length, kv_heads, head_dim] if layout == PREFIX_INPLACE else [batch, kv_heads, length, head_dim]


def past_length_name(layout: str) -> str:
    """The name of the past tensors' sequence dimension: the buffer length for GQA."""
    return {GQA_INPLACE: "max_sequence_length", PREFIX_INPLACE: "total_sequence_length"}.get(layout, "past_sequence_length")


def present_length_name(layout: str) -> str:
    return "max_sequence_length" if layout == GQA_INPLACE else "total_sequence_length"


def translation_table(layout: str) -> dict:
    """custom_translation_table for torch.onnx.export: the in-place layouts' attention op."""
    return {GQA_INPLACE: onnx_gqa.translation_table, PREFIX_INPLACE: onnx_prefix.translation_table}.get(layout, dict)()


def dynamic_shapes(layers: int, layout: str = DEFAULT_KV_LAYOUT) -> dict:
    kv = {1 if layout == PREFIX_INPLACE else 2: past_length_name(layout)}
    return {"inputs_embeds": {1: "sequence_length"}, "attention_mask": {1: "total_sequence_length"},
            "position_ids": {1: "sequence_length"}, "past_key_values": [(kv, kv) for _ in range(layers)]}
