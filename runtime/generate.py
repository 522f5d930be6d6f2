"""Prefill in chunks up to the session's limit, then KV-cache decode one token at a time."""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import torch

from sfedge.errors import SfedgeError
from sfedge.runtime.sampling import Sampler
from sfedge.runtime.sessions.base import ModelSession
from sfedge.runtime.stats import RunStats, now_ms


def prefill(session: ModelSession, embeds: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """Feed embeds [L, H] in chunks of at most ``session.max_prefill_chunk``; logits of the last position."""
    length = embeds.shape[0]
    if start_pos + length > session.max_context:
        raise SfedgeError(
            f"the prompt has {length} tokens but the model's context holds {session.max_context - start_pos}: "
            f"use fewer frames (--frames), a lighter --slowfast spec, or export with a larger --max-context")
    logits = None
    chunk = session.max_prefill_chunk
    for begin in range(0, length, chunk):
        logits = session.decode(embeds[begin:begin + chunk], start_pos + begin)
    return logits


def decode_tokens(session: ModelSession, logits: torch.Tensor, position: int, sampler: Sampler, max_new_tokens: int,
                  eos_ids: Sequence[int], stats: RunStats, fed: Optional[List[int]] = None) -> Iterator[int]:
    """Sample from ``logits`` (the last prompt position's) and keep decoding at ``position``; yield token ids
    (EOS stops, not yielded). Each token fed back into the cache is appended to ``fed`` when given, so a
    caller knows exactly which ids the KV cache holds."""
    decode_start = None
    for step in range(max_new_tokens):
        sample_start = now_ms()
        token = sampler(logits)
        stats.aggregate_sampling_time_ms += now_ms() - sample_start
        if step == 0:
            stats.first_token_ms = now_ms()
            decode_start = stats.first_token_ms
        if token in eos_ids:
            break
        stats.num_generated_tokens += 1
        yield token
        if step + 1 == max_new_tokens or position >= session.max_context:
            break
        logits = session.decode(session.embed(torch.tensor([token], dtype=torch.long)), position)
        if fed is not None:
            fed.append(token)
        position += 1
        stats.decode_ms = now_ms() - decode_start
    stats.inference_end_ms = now_ms()


def generate(session: ModelSession, embeds: torch.Tensor, sampler: Sampler, max_new_tokens: int,
             eos_ids: Sequence[int], stats: Optional[RunStats] = None) -> Iterator[int]:
    """Yield generated token ids (stops at EOS, not yielded, or after max_new_tokens or a full cache)."""
    stats = stats or RunStats()
    session.reset()
    start = now_ms()
    logits = prefill(session, embeds)
    stats.prefill_ms = now_ms() - start
    stats.prompt_eval_end_ms = now_ms()
    stats.num_prompt_tokens = embeds.shape[0]
    yield from decode_tokens(session, logits, embeds.shape[0], sampler, max_new_tokens, eos_ids, stats)
