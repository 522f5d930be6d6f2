"""Qwen2.5 decoder with one static KV cache shared by prefill (T tokens) and decode (T = 1).

``TextDecoder(inputs_embeds[1, T, D], input_pos[1]) -> logits`` follows ExecuTorch's multimodal
``text_decoder`` convention: ``input_pos`` holds the start position, tokens sit at
``start .. start + T - 1``. Parameter names are Hugging Face Qwen2's without the ``model.`` prefix.
The cache+attention step is its own module (``CachedAttention``) so exporters can swap in a
backend-specific one (ExecuTorch custom ops, Core ML masked writes) without touching the layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sfedge.config import LLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, head_dim] in Hugging Face's rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.int64).float(), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class KVCache(nn.Module):
    """Two buffers [1, max_seq_len, kv_heads, head_dim] (the layout ExecuTorch's custom ops use)."""

    def __init__(self, max_seq_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        shape = (1, max_seq_len, kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k_cache.index_copy_(1, positions, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(1, positions, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()


class CachedAttention(nn.Module):
    """Write k/v into the static cache, then attend over it with a causal position mask."""

    def __init__(self, config: LLMConfig, max_seq_len: int, cache_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.groups = config.heads // config.kv_heads
        self.cache = KVCache(max_seq_len, config.kv_heads, config.head_dim, cache_dtype)

    def forward(self, q, k, v, positions, start_pos, mask):  # q [1,T,H,D], k/v [1,T,Hkv,D]
        k_all, v_all = self.cache.update(positions, k, v)
        q = q.transpose(1, 2)
        k_all = k_all.to(q.dtype).transpose(1, 2).repeat_interleave(self.groups, dim=1)
        v_all = v_all.to(q.dtype).transpose(1, 2).repeat_interleave(self.groups, dim=1)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[None, None])
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class Attention(nn.Module):
    def __init__(self, config: LLMConfig, max_seq_len: int, cache_dtype: torch.dtype):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.heads, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden, config.heads * config.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden, config.kv_heads * config.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden, config.kv_heads * config.head_dim, bias=True)
        self.o_proj = nn.Linear(config.heads * config.head_dim, config.hidden, bias=False)
        self.attend = CachedAttention(config, max_seq_len, cache_dtype)

    def forward(self, x, cos, sin, positions, start_pos, mask):
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, t, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        return self.o_proj(self.attend(q, k, v, positions, start_pos, mask))


class GatedMLP(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.down_proj = nn.Linear(config.intermediate, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig, max_seq_len: int, cache_dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden, config.rms_norm_eps)
        self.self_attn = Attention(config, max_seq_len, cache_dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden, config.rms_norm_eps)
        self.mlp = GatedMLP(config)

    def forward(self, x, cos, sin, positions, start_pos, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, start_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TokenEmbedding(nn.Module):
    """token ids [1, T] (int64) -> embeddings [1, T, hidden]; exported as its own component."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids)


class TextDecoder(nn.Module):
    def __init__(self, config: LLMConfig, max_seq_len: int, cache_dtype: torch.dtype = torch.float32,
                 last_logits_only: bool = True):
        super().__init__()
        self.config = config
        self.max_seq_len = max_seq_len
        self.last_logits_only = last_logits_only
        self.layers = nn.ModuleList(DecoderLayer(config, max_seq_len, cache_dtype) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.head_dim, max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [1, T, D]; input_pos [1] start position. Returns logits [1, V] of the last
        position ([1, T, V] when ``last_logits_only`` is False)."""
        t = inputs_embeds.shape[1]
        positions = input_pos + torch.arange(t, dtype=torch.long)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        mask = torch.arange(self.max_seq_len, dtype=torch.long)[None, :] <= positions[:, None]
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, positions, input_pos, mask)
        if self.last_logits_only:
            x = x[:, -1, :]
        return self.lm_head(self.norm(x))

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.attend.cache.reset()
