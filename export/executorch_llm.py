"""The LLM made fast for ExecuTorch: CachedAttention swapped for ExecuTorch's custom LLM ops.

``torch.ops.llama.update_cache`` writes k/v into the static cache in place at ``start_pos`` and
``torch.ops.llama.custom_sdpa`` attends causally over positions ``0 .. start_pos + T - 1`` with
grouped-query heads natively (no repeat_interleave, no [T, max_seq_len] mask). Both read the cache
in the [1, max_seq_len, kv_heads, head_dim] layout sfedge's KVCache already uses, so the swap reuses
the same buffers. One method serves prefill (T > 1) and decode (T = 1) on one shared KV cache.
"""
from __future__ import annotations

import torch
from torch import nn

from sfedge.errors import UsageError
from sfedge.models.llm import CachedAttention, KVCache, TextDecoder


def load_custom_ops() -> None:
    """Importing the module registers ``llama.update_cache`` and ``llama.custom_sdpa`` (AOT + kernels)."""
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UsageError(f"the ExecuTorch exporter needs {exc.name}: pip install 'sfedge[executorch]'") from None


class CustomOpAttention(nn.Module):
    """Drop-in for ``CachedAttention``: same forward signature, ExecuTorch custom ops inside."""

    def __init__(self, cache: KVCache):
        super().__init__()
        self.cache = cache
        self.max_seq_len = cache.k_cache.shape[1]

    def forward(self, q, k, v, positions, start_pos, mask):  # q [1,T,H,D], k/v [1,T,Hkv,D]; mask unused
        seq_len = q.shape[1]
        start = start_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + seq_len <= self.max_seq_len)
        torch.ops.llama.update_cache(k.to(self.cache.k_cache.dtype), self.cache.k_cache, start)
        torch.ops.llama.update_cache(v.to(self.cache.v_cache.dtype), self.cache.v_cache, start)
        out = torch.ops.llama.custom_sdpa(q, self.cache.k_cache, self.cache.v_cache, start, None, 0.0, True)
        return out.reshape(q.shape[0], seq_len, -1)


def use_custom_ops(decoder: TextDecoder) -> int:
    """Swap every CachedAttention of ``decoder`` in place; returns how many were swapped."""
    load_custom_ops()
    swapped = 0
    for layer in decoder.layers:
        attention = layer.self_attn
        if isinstance(attention.attend, CachedAttention):
            attention.attend = CustomOpAttention(attention.attend.cache)
            swapped += 1
    return swapped

