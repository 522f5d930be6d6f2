"""The text decoder with explicit past/present key-values, for ONNX (transformers.js's merged decoder).

The eager ``TextDecoder`` keeps a static KV cache inside each layer's ``self_attn.attend``
(``CachedAttention``). ONNX graphs are stateless, so while exporting we swap every ``attend`` for a
``PastPresentAttention`` that concatenates the layer's past k/v with the new ones and hands the result
back as ``present``. The layers, norms, RoPE tables and lm_head are the eager model's own modules.

    inputs_embeds [1, T, H], attention_mask [1, past + T], position_ids [1, T],
    past_key_values.N.key / .value [1, kv_heads, past, head_dim]
    -> logits [1, 1, V] (last position only), present.N.key / .value [1, kv_heads, past + T, head_dim]

One graph serves prefill (past = 0) and decode (T = 1).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sfedge.models.llm import TextDecoder

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

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups
        self.past: Tuple[torch.Tensor, torch.Tensor] | None = None
        self.present: Tuple[torch.Tensor, torch.Tensor] | None = None

    def bind(self, past_key: torch.Tensor, past_value: torch.Tensor) -> None:
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
            attend.bind(past_key, past_value)
            x = layer(x, cos, sin, positions, positions[:1], mask)
            presents.extend(attend.present)
        logits = decoder.lm_head(decoder.norm(x[:, -1:, :]))
        return (logits, *presents)


@contextlib.contextmanager
def past_present_attention(decoder: TextDecoder) -> Iterator[PastPresentDecoder]:
    """Swap every layer's ``attend`` for ``PastPresentAttention``; the originals come back on exit."""
    originals = [layer.self_attn.attend for layer in decoder.layers]
    config = decoder.config
    try:
        for layer in decoder.layers:
            layer.self_attn.attend = PastPresentAttention(config.heads // config.kv_heads)
        yield PastPresentDecoder(decoder).eval()
    finally:
        for layer, attend in zip(decoder.layers, originals):
            layer.self_attn.attend = attend


def example_inputs(decoder: TextDecoder, tokens: int = 3, past: int = 2) -> tuple:
    """Trace inputs; sizes > 1 keep torch.export from specialising the dynamic dimensions."""
    config = decoder.config
    dtype = decoder.lm_head.weight.dtype
    kv_shape = (1, config.kv_heads, past, config.head_dim)
    past_kv = [(torch.zeros(kv_shape, dtype=dtype), torch.zeros(kv_shape, dtype=dtype)) for _ in range(config.layers)]
    return (torch.zeros(1, tokens, config.hidden, dtype=dtype), torch.ones(1, past + tokens, dtype=torch.long),
            torch.arange(past, past + tokens)[None], past_kv)


def dynamic_shapes(layers: int) -> dict:
    kv = {2: "past_sequence_length"}
    return {"inputs_embeds": {1: "sequence_length"}, "attention_mask": {1: "total_sequence_length"},
            "position_ids": {1: "sequence_length"}, "past_key_values": [(kv, kv) for _ in range(layers)]}
