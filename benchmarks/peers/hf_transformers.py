"""Peer ``transformers``: Qwen2ForCausalLM built from a Qwen2Config with the LLM shape and random
init (fp32, sdpa attention, dynamic cache, logits of the last position only)."""
from __future__ import annotations

import time

from sfedge.errors import SfedgeError


def qwen2_config(llm):
    import transformers

    if llm.hidden != llm.heads * llm.head_dim:
        raise SfedgeError(f"transformers' Qwen2 needs hidden = heads x head_dim (got {llm.hidden} vs {llm.heads} x {llm.head_dim})")
    return transformers.Qwen2Config(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden, intermediate_size=llm.intermediate,
        num_hidden_layers=llm.layers, num_attention_heads=llm.heads, num_key_value_heads=llm.kv_heads,
        max_position_embeddings=llm.max_context, rope_theta=llm.rope_theta, rms_norm_eps=llm.rms_norm_eps,
        tie_word_embeddings=llm.tie_embeddings, attn_implementation="sdpa")


def measure_transformers(job: dict) -> dict:
    import torch

    from sfedge.benchmarks.peers.common import config_of, measure, token_ids

    try:
        import transformers
    except ModuleNotFoundError:
        raise SfedgeError("the transformers peer needs transformers: pip install 'sfedge[dev]'") from None
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    llm = config_of(job).llm
    start = time.perf_counter_ns()
    torch.manual_seed(job["seed"])
    model = transformers.Qwen2ForCausalLM(qwen2_config(llm)).eval()
    load_ms = (time.perf_counter_ns() - start) / 1e6
    ids = token_ids(llm.vocab_size, job["prompt_tokens"], job["seed"])[None]
    state: dict = {}

    @torch.inference_mode()
    def prefill_fn():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return out.logits[0, -1]

    @torch.inference_mode()
    def step_fn(token: int, position: int):
        out = model(input_ids=torch.tensor([[token]]), past_key_values=state["past"], use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return out.logits[0, -1]

    result = measure(prefill_fn, step_fn, job)
    return {**result, "name": f"transformers {transformers.__version__}", "model_load_ms": load_ms,
            "threads": torch.get_num_threads()}
