"""Roofline arithmetic: how much work each stage does, and what share of the machine's limits the
measured speed reaches.

- decode is bandwidth-bound: every token reads the decoder's weights once plus the KV cache so far.
  Bytes per token = weight bytes (artifact file size, or parameters x 4 for the fp32 eager model)
  + KV bytes per position x the average context length during decode.
- prefill and vision encode are FLOP-bound: 2 x parameters x tokens for the matmuls, plus attention
  (causal prefill: 2 x layers x L^2 x heads x head_dim; the encoder's full attention:
  4 x depth x patches^2 x width per frame).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from sfedge.config import ModelConfig


@dataclass
class Work:
    decoder_weight_bytes: int  # read once per decoded token
    kv_bytes_per_position: int
    decode_bytes_per_token: float  # weights + KV at the average decode position
    prefill_flops: float
    encode_flops: float  # all frames
    weight_bytes_source: str  # "artifact" or "parameters"

    def to_dict(self) -> dict:
        return asdict(self)


def decoder_read_params(config: ModelConfig, counts: dict) -> int:
    """Parameters a decode step reads: the decoder plus the LM head (the tied embedding matrix is
    read in full by the head; the embedding lookup reads one row)."""
    llm = config.llm
    head = llm.vocab_size * llm.hidden if llm.tie_embeddings else 0
    return counts["text_decoder"] + head


def prefill_flops(config: ModelConfig, counts: dict, tokens: int, chunks: int = 1) -> float:
    llm = config.llm
    head = llm.vocab_size * llm.hidden
    body = counts["text_decoder"] - (0 if llm.tie_embeddings else head)  # without the LM head
    attention = 2.0 * llm.layers * tokens * tokens * llm.heads * llm.head_dim
    return 2.0 * body * tokens + attention + 2.0 * head * chunks  # the head runs on each chunk's last position


def encode_flops(config: ModelConfig, counts: dict, frames: int) -> float:
    vision = config.vision
    patches = vision.patches_per_frame
    per_frame = 2.0 * counts["vision_encoder"] * patches + 4.0 * vision.depth * patches * patches * vision.width
    return per_frame * frames


def compute_work(config: ModelConfig, counts: dict, prompt_tokens: int, gen_tokens: int, frames: int,
                 decoder_file_bytes: Optional[int] = None, kv_bytes_per_value: int = 4,
                 prefill_chunk: Optional[int] = None) -> Work:
    if decoder_file_bytes:
        weight_bytes, source = int(decoder_file_bytes), "artifact"
    else:
        weight_bytes, source = decoder_read_params(config, counts) * 4, "parameters"
    kv = config.llm.kv_bytes_per_token(kv_bytes_per_value)
    average_position = prompt_tokens + gen_tokens / 2
    chunks = -(-prompt_tokens // prefill_chunk) if prefill_chunk else 1
    return Work(decoder_weight_bytes=weight_bytes, kv_bytes_per_position=kv,
                decode_bytes_per_token=weight_bytes + kv * average_position,
                prefill_flops=prefill_flops(config, counts, prompt_tokens, chunks),
                encode_flops=encode_flops(config, counts, frames), weight_bytes_source=source)


def shares(work: dict, limits: dict, decode_tok_s: float, prefill_ms: float, encode_ms: float) -> dict:
    """Measured speed as a fraction of the roofline (1.0 = at the machine's measured limit)."""
    read_bytes_s = limits["read_gb_s"] * 1e9
    flops_s = limits["matmul_gflop_s"] * 1e9
    decode_roof = read_bytes_s / work["decode_bytes_per_token"]
    out = {"decode_roofline_tok_s": decode_roof,
           "decode_bandwidth_share": decode_tok_s / decode_roof if decode_roof else 0.0,
           "decode_achieved_gb_s": decode_tok_s * work["decode_bytes_per_token"] / 1e9}
    out["prefill_gflop_s"] = work["prefill_flops"] / (prefill_ms / 1e3) / 1e9 if prefill_ms else 0.0
    out["prefill_flop_share"] = out["prefill_gflop_s"] * 1e9 / flops_s
    out["encode_gflop_s"] = work["encode_flops"] / (encode_ms / 1e3) / 1e9 if encode_ms else 0.0
    out["encode_flop_share"] = out["encode_gflop_s"] * 1e9 / flops_s
    return out
