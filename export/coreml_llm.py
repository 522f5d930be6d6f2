"""The LLM made convertible to a stateful Core ML model: a module swap plus three fixed-shape entry points.

Core ML keeps the KV cache as model *state* (``ct.StateType``, iOS18): fp16 buffers read with
``read_state`` and written with ``coreml_update_state``. With coremltools 9.0 only the torch.export
route converts such a model, and ``index_copy`` (what sfedge's ``KVCache.update`` and transformers'
StaticCache use) is rejected. So each layer's ``self_attn.attend`` (a ``CachedAttention``) is swapped
for ``MaskedCacheAttention``, which writes the new k/v with dense ops only: a one-hot [S, T] position
matrix scatters the T new rows by matmul, ``where`` keeps the old rows, and the whole buffer is
written back (``cache[:, :, :, :] = new``). That is exact in fp16 (one non-zero term per row) and
uses no dynamic slicing, so shapes stay static (what the Neural Engine needs).

The cache layout is [1, kv_heads, max_context, head_dim] (heads first: attention reads it without a
transpose). The layers, norms, RoPE tables and lm_head are the model's own; only the top-level step
differs from ``TextDecoder.forward``: it returns the logits of the position ``last_index`` so a
partial prefill chunk (padded to the fixed length) still yields the last real token's logits.
"""
from __future__ import annotations

import torch
from torch import nn

from sfedge.models.llm import CachedAttention, TextDecoder

CACHE_DTYPE = torch.float16  # Core ML states are fp16


class MaskedCacheAttention(nn.Module):
    """Drop-in for ``CachedAttention`` (same forward signature) with a Core ML friendly cache write."""

    def __init__(self, groups: int, kv_heads: int, max_seq_len: int, head_dim: int, explicit_softmax: bool = False):
        super().__init__()
        self.groups = groups
        self.explicit_softmax = explicit_softmax
        shape = (1, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=CACHE_DTYPE), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=CACHE_DTYPE), persistent=False)

    def _write(self, cache: torch.Tensor, new: torch.Tensor, onehot: torch.Tensor, written: torch.Tensor) -> None:
        rows = torch.matmul(onehot, new.transpose(1, 2).to(CACHE_DTYPE))  # [1, Hkv, S, D]
        cache[:, :, :, :] = torch.where(written, rows, cache)

    def forward(self, q, k, v, positions, start_pos, mask):  # q [1,T,H,D], k/v [1,T,Hkv,D], mask [T,S] bool
        seq = self.k_cache.shape[2]
        onehot = (torch.arange(seq, dtype=positions.dtype)[:, None] == positions[None, :]).to(CACHE_DTYPE)  # [S, T]
        written = onehot.sum(dim=-1, keepdim=True) > 0  # [S, 1]; positions >= S are dropped, not wrapped
        self._write(self.k_cache, k, onehot, written)
        self._write(self.v_cache, v, onehot, written)
        qh = q.transpose(1, 2)
        keys = self.k_cache.to(q.dtype).repeat_interleave(self.groups, dim=1)
        values = self.v_cache.to(q.dtype).repeat_interleave(self.groups, dim=1)
        bias = torch.where(mask, 0.0, float("-inf")).to(q.dtype)
        if self.explicit_softmax:  # coremltools' fused sdpa fails shape checks when T is dynamic
            scores = torch.matmul(qh, keys.transpose(2, 3)) * (qh.shape[-1] ** -0.5) + bias
            out = torch.matmul(torch.softmax(scores, dim=-1), values)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(qh, keys, values, attn_mask=bias[None, None])
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()


def use_masked_cache(decoder: TextDecoder, explicit_softmax: bool = False) -> int:
    """Swap every layer's ``CachedAttention`` for ``MaskedCacheAttention`` in place; returns how many.
    ``explicit_softmax`` spells attention out as matmul + softmax (for dynamic sequence lengths)."""
    config = decoder.config
    swapped = 0
    for layer in decoder.layers:
        if isinstance(layer.self_attn.attend, CachedAttention):
            layer.self_attn.attend = MaskedCacheAttention(config.heads // config.kv_heads, config.kv_heads,
                                                          decoder.max_seq_len, config.head_dim, explicit_softmax)
            swapped += 1
    return swapped


def cache_buffers(decoder: TextDecoder) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) of every swapped cache, in layer order: k_0, v_0, k_1, v_1, ..."""
    out = []
    for i, layer in enumerate(decoder.layers):
        attend = layer.self_attn.attend
        out += [(f"k_{i}", attend.k_cache), (f"v_{i}", attend.v_cache)]
    return out


class DecoderStep(nn.Module):
    """``(inputs_embeds[1, T, H], input_pos[1] int32, last_index[1] int32) -> logits[1, V]`` for a fixed T.

    Tokens sit at ``input_pos .. input_pos + T - 1``; logits are those of row ``last_index``. Rows after
    ``last_index`` are padding: their k/v land in the cache beyond the real tokens and are overwritten
    by the next call before any query can attend to them (the causal mask hides them until then).
    """

    def __init__(self, decoder: TextDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        start = input_pos.to(torch.long)
        positions = start + torch.arange(inputs_embeds.shape[1], dtype=torch.long)
        table_rows = positions.clamp(max=d.max_seq_len - 1)  # padding past the cache end reads a valid row
        cos, sin = d.rope_cos[table_rows], d.rope_sin[table_rows]
        mask = torch.arange(d.max_seq_len, dtype=torch.long)[None, :] <= positions[:, None]
        x = inputs_embeds
        for layer in d.layers:
            x = layer(x, cos, sin, positions, start, mask)
        x = torch.index_select(x, 1, last_index.to(torch.long))[:, 0, :]
        return d.lm_head(d.norm(x))


class EmbedStep(nn.Module):
    """``token_ids[1, T] int32 -> embeddings[1, T, H]`` (the model's own token embedding)."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(token_ids.to(torch.long))
