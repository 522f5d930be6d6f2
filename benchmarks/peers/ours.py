"""Our side: the runtime (the eager model of a preset, or an artifact folder of any backend)."""
from __future__ import annotations

import time

from sfedge.errors import SfedgeError


def measure_ours(job: dict) -> dict:
    import torch

    from sfedge.benchmarks.peers.common import measure, token_ids
    from sfedge.runtime.generate import prefill
    from sfedge.runtime.pipeline import Pipeline
    from sfedge.runtime.sessions import SessionOptions

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    source = job["source"]
    start = time.perf_counter_ns()
    if source.get("folder"):
        pipeline = Pipeline.from_folder(source["folder"], SessionOptions(verify=job["verify"], threads=job.get("threads")),
                                        source.get("backend"))
    else:
        from sfedge.config import get_preset
        from sfedge.models import WeightsSource

        tiny = get_preset("tiny")
        config = get_preset(source["preset"]).replace(vision=tiny.vision, slowfast=tiny.slowfast)  # the LLM only matters
        pipeline = Pipeline.from_preset(config, WeightsSource(seed=job["seed"]),
                                        job["prompt_tokens"] + job["gen_tokens"] + 16)
    load_ms = (time.perf_counter_ns() - start) / 1e6
    session = pipeline.session
    if job["prompt_tokens"] + job["gen_tokens"] > session.max_context:
        raise SfedgeError(f"{job['prompt_tokens']} + {job['gen_tokens']} tokens do not fit the context of {session.max_context}")
    embeds = session.embed(token_ids(session.config.llm.vocab_size, job["prompt_tokens"], job["seed"]))

    def prefill_fn():
        session.reset()
        return prefill(session, embeds)

    def step_fn(token: int, position: int):
        return session.decode(session.embed(torch.tensor([token], dtype=torch.long)), position)

    result = measure(prefill_fn, step_fn, job)
    recipe = session.manifest.recipe if session.manifest and session.backend != "eager" else "fp32"
    return {**result, "name": f"sfedge {session.backend} {recipe}", "model_load_ms": load_ms,
            "threads": job.get("threads") or torch.get_num_threads(),
            "notes": [f"prefill chunk {session.max_prefill_chunk}"]}
