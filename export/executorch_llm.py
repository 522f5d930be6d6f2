"""The LLM made fast for ExecuTorch: CachedAttention swapped for ExecuTorch's custom LLM ops.

``torch.ops.llama.update_cache`` writes k/v into the static cache in place at ``start_pos`` and
``torch.ops.llama.custom_sdpa`` attends over the cache with grouped-query heads natively (no
repeat_interleave). Both read the cache in the [1, max_seq_len, kv_heads, head_dim] layout sfedge's
KVCache already uses, so the swap reuses the same buffers. One method serves prefill (T > 1) and
decode (T = 1) on one shared KV cache.

Two attention modes (``ATTENTION_MODES``), chosen per recipe:

* ``causal``: ``custom_sdpa(..., is_causal=True)`` reads positions ``0 .. start_pos + T - 1`` only,
  but runs one query row per head: for T = 1 each of the ``heads`` rows is its own M = 1 GEMV over
  its kv head (a kv head is read ``heads / kv_heads`` times), 1.6-3 GB/s on a 2-core Xeon.
* ``gqa-masked``: the ``heads / kv_heads`` query heads that share a kv head are folded into the query
  rows (q [1, T*R, kv_heads, D]) with a float mask that hides the future: one M = T*R GEMM per kv head
  that reads the cache once, but over the whole ``max_seq_len`` (the kernel takes a mask only without
  ``is_causal``, and then attends over every cached position). Decode costs the same at any context
  (set by ``--max-context``): 3-4x faster than ``causal`` near the end of the cache, slower early on.

* ``prefix`` (T = 1 only): ``torch.ops.sfedge.decode_attention``, sfedge's own kernel
  (export/executorch_kernels.py, export/kernels/decode_attention.cpp): reads positions ``0 .. start_pos``
  only, each cached row once for all the query heads that share it, float32 or bfloat16 cache. Decode
  cost grows with the context, not with ``--max-context``, at a few times gqa-masked's rate.
* ``chunk`` (any T): ``torch.ops.sfedge.chunk_attention``, sfedge's prefill kernel
  (export/kernels/chunk_attention.cpp): token t attends to ``0 .. start_pos + t`` as a flash-attention loop
  over ~96-row tiles (the query heads of a kv head x a few tokens), ~5x custom_sdpa's rate on a prefill
  chunk at video context lengths; a single token (a decode step) goes to the decode kernel, in the same op.

A recipe asks for an attention form (``ATTENTION_FORMS``): ``causal`` or ``gqa-masked`` (one method), or

* ``switch``: two methods over the same KV cache (``share_mutable_buffers``): ``text_decoder`` (T in 1..chunk,
  causal) for prefill and a T = 1 gqa-masked ``text_decoder_flat`` that the runtime uses for decode from
  ``FLAT_FROM_FRACTION * max_seq_len`` on, where the full-cache pass gets cheaper than the causal one
  (sdpa_probe, 1B heads, 2-core Xeon: causal ~0.9 us per cached position, gqa-masked ~0.3 us per cache slot).
* ``sfedge``: one method, ``text_decoder`` in mode ``chunk`` for prefill chunks and decode steps alike: the chunk
  kernel hands a single token to the decode kernel, which reads the cache in place. (Folders exported before
  2026-11-30 13:30 carry a second, ``prefix``-mode ``text_decoder_flat`` method; the runtime still uses it. Loading
  that second method re-packed every XNNPACK weight: a 3.6-4.5 s stall at the first decode step of a 1B process,
  and ~0.7 GB more memory.)

The KV cache dtype (``KV_DTYPES``) is float32, float16 or bfloat16 (custom_sdpa and update_cache
take all three; q is cast to the cache dtype, the output back to float32).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from sfedge.errors import UsageError
from sfedge.export.executorch_kernels import define_ops
from sfedge.models.llm import CachedAttention, KVCache, TextDecoder

KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ATTENTION_MODES = ("causal", "gqa-masked", "prefix", "chunk")
METHOD_DECODE_FLAT = "text_decoder_flat"
FLAT_FROM_FRACTION = 0.3


@dataclasses.dataclass(frozen=True)
class FlatMethod:
    """The T = 1 method of a two-method export: its attention mode and the fraction of the cache it is used from."""
    mode: str
    from_fraction: float


@dataclasses.dataclass(frozen=True)
class AttentionForm:
    """What a recipe's ``attention`` option exports: ``text_decoder``'s mode (prefill chunks, and decode steps
    unless there is a flat method), the optional T = 1 flat method, and whether sfedge's kernel library is needed."""
    prefill: str
    flat: Optional[FlatMethod] = None
    kernels: bool = False


ATTENTION_FORMS = {
    "causal": AttentionForm("causal"),
    "gqa-masked": AttentionForm("gqa-masked"),
    "switch": AttentionForm("causal", FlatMethod("gqa-masked", FLAT_FROM_FRACTION)),
    # one method: the chunk kernel hands single-token calls to the decode kernel (export/kernels/chunk_attention.cpp)
    "sfedge": AttentionForm("chunk", kernels=True),
}
EXPORT_ATTENTION = tuple(ATTENTION_FORMS)  # what a recipe may ask for


def flat_from_position(max_seq_len: int, attention: str = "switch") -> int:
    """Where the flat method takes over decode steps (``max_seq_len``: never, for a one-method form)."""
    flat = ATTENTION_FORMS[attention].flat
    return int(max_seq_len * flat.from_fraction) if flat else max_seq_len


def load_custom_ops() -> None:
    """Importing the module registers ``llama.update_cache`` and ``llama.custom_sdpa`` (AOT + kernels)."""
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UsageError(f"the ExecuTorch exporter needs {exc.name}: pip install 'sfedge[executorch]'") from None


def kv_torch_dtype(name: str) -> torch.dtype:
    if name not in KV_DTYPES:
        raise UsageError(f"KV-cache dtype {name!r} is not supported by the ExecuTorch custom ops; use one of: {', '.join(KV_DTYPES)}")
    return KV_DTYPES[name]


PREFIX_KV_DTYPES = (torch.float32, torch.bfloat16)  # what sfedge's kernels read
KERNEL_MODES = ("prefix", "chunk")  # attention modes that run sfedge's kernels
MODE_OPS = {"causal": "llama.custom_sdpa", "gqa-masked": "llama.custom_sdpa", "prefix": "sfedge.decode_attention",
            "chunk": "sfedge.chunk_attention"}  # the attention op each mode runs (the manifest says it)


def _check_mode(mode: str, kv_dtype: torch.dtype) -> None:
    if mode not in ATTENTION_MODES:
        raise UsageError(f"attention mode {mode!r} is unknown; use one of: {', '.join(ATTENTION_MODES)}")
    if mode in KERNEL_MODES and kv_dtype not in PREFIX_KV_DTYPES:
        raise UsageError(f"attention {mode!r} (sfedge's kernels) reads float32 or bfloat16 KV caches, not "
                         f"{str(kv_dtype).replace('torch.', '')}: use kv_dtype float32 or bfloat16")


class CustomOpAttention(nn.Module):
    """Drop-in for ``CachedAttention``: same forward signature, ExecuTorch custom ops inside."""

    def __init__(self, cache: KVCache, mode: str = "causal"):
        super().__init__()
        _check_mode(mode, cache.k_cache.dtype)
        self.cache = cache
        self.mode = mode
        self.max_seq_len = cache.k_cache.shape[1]

    def forward(self, q, k, v, positions, start_pos, mask):  # q [1,T,H,D], k/v [1,T,Hkv,D]; mask unused
        seq_len = q.shape[1]
        start = start_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + seq_len <= self.max_seq_len)
        dtype = self.cache.k_cache.dtype
        torch.ops.llama.update_cache(k.to(dtype), self.cache.k_cache, start)
        torch.ops.llama.update_cache(v.to(dtype), self.cache.v_cache, start)
        if self.mode == "causal":
            out = torch.ops.llama.custom_sdpa(q.to(dtype), self.cache.k_cache, self.cache.v_cache, start, None, 0.0, True)
        elif self.mode == "prefix":
            if seq_len != 1:
                raise UsageError(f"attention mode 'prefix' decodes one token at a time, got {seq_len}: prefill with 'causal'")
            out = torch.ops.sfedge.decode_attention(q.float(), self.cache.k_cache, self.cache.v_cache, start)
        elif self.mode == "chunk":
            out = torch.ops.sfedge.chunk_attention(q.float(), self.cache.k_cache, self.cache.v_cache, start)
        else:
            out = self._gqa_masked(q.to(dtype), start, seq_len)
        return out.to(q.dtype).reshape(q.shape[0], seq_len, -1)

    def _gqa_masked(self, q, start, seq_len):
        """Fold the R query heads of each kv head into the rows: row t*R + r is token t, head h*R + r."""
        _, _, heads, dim = q.shape
        kv_heads = self.cache.k_cache.shape[2]
        reps = heads // kv_heads
        folded = q.reshape(1, seq_len, kv_heads, reps, dim).permute(0, 1, 3, 2, 4).reshape(1, seq_len * reps, kv_heads, dim)
        last = (torch.arange(seq_len, device=q.device) + start)[:, None].expand(seq_len, reps).reshape(-1)  # last visible position per row
        visible = torch.arange(self.max_seq_len, device=q.device)[None, :] <= last[:, None]
        attn_mask = torch.where(visible, 0.0, float("-inf")).to(torch.float32)
        out = torch.ops.llama.custom_sdpa(folded, self.cache.k_cache, self.cache.v_cache, 0, attn_mask, 0.0, False)
        return out.reshape(1, seq_len, reps, kv_heads, dim).permute(0, 1, 3, 2, 4).reshape(1, seq_len, heads * dim)


def set_attention_mode(decoder: TextDecoder, mode: str) -> None:
    """Switch every swapped attention of ``decoder`` to ``mode`` (the caches stay)."""
    for layer in decoder.layers:
        if isinstance(layer.self_attn.attend, CustomOpAttention):
            _check_mode(mode, layer.self_attn.attend.cache.k_cache.dtype)
            layer.self_attn.attend.mode = mode


def use_custom_ops(decoder: TextDecoder, mode: str = "causal", kv_dtype: str = "float32") -> int:
    """Swap every CachedAttention of ``decoder`` in place (cache re-allocated in ``kv_dtype``); returns how many."""
    load_custom_ops()
    define_ops()  # torch.ops.sfedge.decode_attention / chunk_attention: PyTorch side only, nothing compiled
    dtype = kv_torch_dtype(kv_dtype)
    swapped = 0
    for layer in decoder.layers:
        attention = layer.self_attn
        if isinstance(attention.attend, CachedAttention):
            cache = attention.attend.cache
            if cache.k_cache.dtype != dtype:
                cache.k_cache = cache.k_cache.to(dtype)
                cache.v_cache = cache.v_cache.to(dtype)
            attention.attend = CustomOpAttention(cache, mode)
            swapped += 1
    return swapped
