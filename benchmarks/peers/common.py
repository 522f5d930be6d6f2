"""What every side of a peers run shares: the model config of a job, the token ids, and the timing
loop (prefill the prompt, then decode greedily, warm-up + repetitions)."""
from __future__ import annotations

import time

from sfedge.runtime.stats import peak_rss_bytes

SAMPLE_METRICS = ("prefill_ms", "prefill_tokens_per_s", "decode_tokens_per_s")


def config_of(job: dict):
    """The ModelConfig of a job's source: the artifact folder's manifest, or the preset."""
    from sfedge.config import ModelConfig, get_preset
    from sfedge.manifest import read_manifest

    source = job["source"]
    if source.get("folder"):
        return ModelConfig.from_dict(read_manifest(source["folder"]).model_config)
    return get_preset(source["preset"])


def weights_seed(job: dict) -> int:
    """The seed of the random weights: the folder's (manifest) or the job's --seed for a preset."""
    from sfedge.manifest import read_manifest

    folder = job["source"].get("folder")
    return int(read_manifest(folder).weights.get("seed", 0)) if folder else int(job["seed"])


def token_ids(vocab: int, count: int, seed: int):
    """The prompt every side is fed: ``count`` seeded ids in [3, vocab)."""
    import torch

    return torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(seed))


def empty_samples() -> dict:
    return {name: [] for name in SAMPLE_METRICS}


def add_sample(samples: dict, prompt_tokens: int, prefill_ms: float, decoded: int, decode_ms: float) -> None:
    samples["prefill_ms"].append(prefill_ms)
    samples["prefill_tokens_per_s"].append(prompt_tokens / (prefill_ms / 1e3) if prefill_ms else 0.0)
    samples["decode_tokens_per_s"].append(decoded / (decode_ms / 1e3) if decode_ms else 0.0)


def measure(prefill_fn, step_fn, job: dict) -> dict:
    """prefill_fn() -> logits; step_fn(token, position) -> logits; returns samples + summaries.
    Decode rate = (G - 1) steps after the first token / their time (the first token comes from prefill)."""
    from sfedge.benchmarks.summary import summarize_all

    prompt, gen = job["prompt_tokens"], job["gen_tokens"]
    samples = empty_samples()
    for rep in range(job["warmup"] + job["repetitions"]):
        start = time.perf_counter_ns()
        logits = prefill_fn()
        prefill_ns = time.perf_counter_ns() - start
        start = time.perf_counter_ns()
        for step in range(gen - 1):
            logits = step_fn(int(logits.argmax()), prompt + step)
        decode_ns = time.perf_counter_ns() - start
        if rep >= job["warmup"]:
            add_sample(samples, prompt, prefill_ns / 1e6, gen - 1, decode_ns / 1e6)
    return {"metrics": summarize_all(samples), "samples": samples, "peak_rss_bytes": peak_rss_bytes()}
