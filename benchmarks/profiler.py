"""Measure a device profile (benchmarks/costmodel.py) with direct session calls, in a fresh process:
``python -m sfedge.benchmarks.profiler`` reads a JSON job on stdin and prints the profile as one JSON
line on stdout (progress on stderr), like benchmarks/worker.py.

For each frame count (ascending): decode + preprocess the video, run the vision encoder (per
encoder call), the projector where the export has one for that count, then continue ONE prefill in
chunks up to that count's context (every chunk is a timing at its position) and decode a few
tokens there (timings at that position); the process's peak RSS after each count gives the
activation line. One prefill serves every count and continues to twice the largest count's context (for the
attention slope), so a profile costs about two prefills at the largest frame count.
"""
from __future__ import annotations

import datetime
import socket
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

from sfedge.benchmarks.cases import Source
from sfedge.benchmarks.costmodel import (KV_BYTES_PER_VALUE, SCHEMA, DeviceProfile, Machine, ProfiledModel, fit_linear,
                                         manifest_sha256)
from sfedge.errors import SfedgeError

PROFILER_MODULE = "sfedge.benchmarks.profiler"
EAGER_CHUNK = 128  # the eager model prefills in one call; the profile times it in chunks of at most this many tokens
MIN_PREFILL_POINTS = 8  # eager: chunks small enough for this many timings up to the largest context
DECODE_STEPS = 8  # decode steps timed at each frame count's context


@dataclass(frozen=True)
class ProfileJob:
    source: Source
    video: str
    frames: tuple
    threads: Optional[int] = None
    repeats: int = 3
    gen_tokens: int = 32
    seed: int = 0
    verify: bool = True
    limits: Optional[dict] = None  # measured by the caller in its own worker (keeps this process's RSS clean)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> "ProfileJob":
        return ProfileJob(**{**data, "source": Source(**data["source"]), "frames": tuple(data["frames"])})


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _timed(fn):
    start = time.perf_counter_ns()
    out = fn()
    return out, (time.perf_counter_ns() - start) / 1e6


def _best(fn, repeats: int):
    """(output, median ms over ``repeats`` calls after one unmeasured call): the bench reports means
    over warmed-up repetitions, so the profile neither keeps cold calls nor only the luckiest one."""
    out = fn()
    times = []
    for _ in range(max(repeats, 1)):
        out, ms = _timed(fn)
        times.append(ms)
    return out, sorted(times)[len(times) // 2]


def _pipeline(job: ProfileJob):
    from sfedge.budget import compute_budget
    from sfedge.config import get_preset
    from sfedge.models import WeightsSource
    from sfedge.runtime.pipeline import Pipeline
    from sfedge.runtime.sessions import SessionOptions

    source = job.source
    if source.folder:
        return Pipeline.from_folder(source.folder, SessionOptions(verify=job.verify, threads=job.threads), source.backend)
    config = get_preset(source.preset).with_slowfast(max(job.frames))
    budget = compute_budget(config, 64, max_new_tokens=job.gen_tokens + DECODE_STEPS)
    context = min(budget.total_tokens + EAGER_CHUNK + 16, config.llm.max_context)
    return Pipeline.from_preset(config, WeightsSource(seed=job.seed), context)


def _kv_dtype(session) -> str:
    from sfedge.manifest import Component

    if session.manifest is None or session.backend == "eager":
        return "fp32"
    return str(session.manifest.component(Component.TEXT_DECODER).extra.get("kv_dtype", "fp32"))


def measure(job: ProfileJob) -> DeviceProfile:
    import torch

    from sfedge.benchmarks.provenance import cpu_model, provenance
    from sfedge.budget import DEFAULT_QUESTION, visual_token_counts
    from sfedge.prompt import tokenize_prompt
    from sfedge.runtime.sampling import Sampler, SamplingConfig
    from sfedge.runtime.stats import peak_rss_bytes
    from sfedge.runtime.video import load_video, preprocess

    if job.threads:
        torch.set_num_threads(job.threads)
    rss_start = peak_rss_bytes()
    pipeline = _pipeline(job)
    rss_loaded = peak_rss_bytes()
    session, config = pipeline.session, pipeline.config
    source = job.source
    parts = tokenize_prompt(pipeline.tokenizer, DEFAULT_QUESTION, config.prompt_template)
    def embed_prompt():  # as Pipeline.prepare times it: tokenize, then embed both text parts
        prompt = tokenize_prompt(pipeline.tokenizer, DEFAULT_QUESTION, config.prompt_template)
        return (session.embed(torch.tensor(prompt.before, dtype=torch.long)),
                session.embed(torch.tensor(prompt.after, dtype=torch.long)))

    _, embed_ms = _best(embed_prompt, job.repeats)
    sampler = Sampler(SamplingConfig())
    one_token = torch.tensor([0], dtype=torch.long)
    chunk = session.max_prefill_chunk
    if session.backend == "eager":
        _, slow, fast = visual_token_counts(config, max(job.frames))
        chunk = max(1, min(chunk, EAGER_CHUNK, -(-(slow + fast + parts.text_tokens) // MIN_PREFILL_POINTS)))
    generator = torch.Generator().manual_seed(job.seed)
    chunk_embeds = session.embed(torch.randint(0, config.llm.vocab_size, (chunk,), generator=generator))
    step_embed = chunk_embeds[:1]
    kv_dtype = _kv_dtype(session)
    kv_per_token = config.llm.kv_bytes_per_token(KV_BYTES_PER_VALUE.get(kv_dtype, 4))
    batch = session.encoder_batch or 0
    frames = sorted(set(job.frames))
    counts = tuple(session.frame_counts)
    for _ in range(2):  # warm the decoder up: a chunk, then single steps
        session.decode(chunk_embeds, 0)
        for step in range(DECODE_STEPS):
            session.decode(step_embed, chunk + step)
        session.reset()
    points = {name: [] for name in ("video", "encode", "projector", "prefill", "decode", "activation")}
    measured: List[dict] = []
    position = 0

    def decode_here() -> float:
        """DECODE_STEPS timed decode steps at the current position; one (position, median) point."""
        nonlocal position
        start, times = position, []
        for _ in range(DECODE_STEPS):
            # as generate() does per token: sample from the logits, embed the token, decode it
            _, ms = _timed(lambda: sampler(session.decode(session.embed(one_token), position)))
            times.append(ms)
            position += 1
        median = sorted(times)[len(times) // 2]
        points["decode"].append((start + (DECODE_STEPS - 1) / 2, median))
        return median

    decode_here()  # the short-context end of the decode line
    prefill_total = 0.0  # one prefill, continued from count to count: cumulative up to each count's context
    for n in frames:
        def video():
            decoded = load_video(job.video, config.vision.frame_size, n)
            pixels = preprocess(decoded.frames, config.vision.pixel_mean, config.vision.pixel_std)
            return pixels[torch.arange(n) % pixels.shape[0]]  # a short video repeats frames, as static exports do
        pixels, video_ms = _best(video, job.repeats)
        points["video"].append((n, video_ms))
        if batch:
            calls = [pixels[i:i + batch] for i in range(0, n, batch)]
            calls = [c if c.shape[0] == batch else torch.cat([c, c.new_zeros((batch - c.shape[0], *c.shape[1:]))]) for c in calls]
            if not points["encode"]:
                session.encode(calls[0])  # warm-up; every later call is one timing (a 1B frame takes seconds)
            call_times = [_timed(lambda c=c: session.encode(c))[1] for c in calls]
            points["encode"].extend((batch, ms) for ms in call_times)
            encode_total = sum(call_times)
        else:
            _, encode_total = _best(lambda: session.encode(pixels), job.repeats)
            points["encode"].append((n, encode_total))
        row = {"frames": n, "video_ms": video_ms, "vision_encode_ms": encode_total, "embed_ms": embed_ms}
        if not counts or n in counts:
            features = pipeline.encode_frames(pixels)
            visual, project_ms = _best(lambda: session.project(features), job.repeats)
            points["projector"].append((n, project_ms))
            row["projector_ms"] = project_ms
            visual_tokens = visual.shape[0]
        else:
            _, slow, fast = visual_token_counts(config, n)
            visual_tokens = slow + fast
        context = visual_tokens + parts.text_tokens
        if context + DECODE_STEPS > session.max_context:
            raise SfedgeError(f"{source.label}: {n} frames need a context of {context + DECODE_STEPS} but the export holds "
                              f"{session.max_context}; profile fewer frames or re-export with a larger --max-context")
        while position < context:
            take = min(chunk, session.max_context - position - DECODE_STEPS)
            if take < 1:
                break
            _, ms = _timed(lambda: session.decode(chunk_embeds[:take], position))
            points["prefill"].append((position + (take - 1) / 2, ms / take))
            prefill_total += ms
            position += take
        decode_ms = decode_here()
        peak = peak_rss_bytes()
        points["activation"].append((n, peak - rss_loaded - kv_per_token * position))
        row.update({"visual_tokens": visual_tokens, "context": position, "prefill_ms_to_here": prefill_total,
                    "decode_ms_per_token": decode_ms, "peak_rss_bytes": peak})
        measured.append(row)
        _log(f"  {n} frames: encode {encode_total:.1f} ms, context {position}, decode "
             f"{row['decode_ms_per_token']:.2f} ms/token, peak RSS {peak / 2**20:.0f} MiB")
    # continue the prefill to twice the largest context (the export's limit at most): the attention
    # slope needs a long enough line, and larger frame counts are then interpolated, not extrapolated
    target = min(2 * position, session.max_context - DECODE_STEPS)
    while position + 1 < target:
        take = min(chunk, target - position)
        _, ms = _timed(lambda: session.decode(chunk_embeds[:take], position))
        points["prefill"].append((position + (take - 1) / 2, ms / take))
        position += take
    if position + DECODE_STEPS <= session.max_context and points["decode"][-1][0] < position:
        decode_here()
    if not points["projector"]:
        raise SfedgeError(f"{source.label}: none of --frames {','.join(map(str, frames))} has a projector in this export "
                          f"(it has {','.join(map(str, counts))}); include one of those")
    fits = {
        "video_ms": fit_linear(points["video"], "frames", "ms", nonnegative_slope=True),
        "encode_call_ms": fit_linear(points["encode"], "frames_per_call", "ms", nonnegative_slope=True),
        "projector_ms": fit_linear(points["projector"], "frames", "ms", nonnegative_slope=True),
        "embed_ms": fit_linear([(parts.text_tokens, embed_ms)], "text_tokens", "ms"),
        "prefill_ms_per_token": fit_linear(points["prefill"], "position", "ms_per_token", True, "constant"),
        "decode_ms_per_token": fit_linear(points["decode"], "position", "ms_per_token", True, "constant"),
        "activation_bytes": fit_linear(points["activation"], "frames", "bytes"),
    }
    limits = job.limits or {}
    manifest = session.manifest
    model = ProfiledModel(
        label=source.label, preset=config.name, backend=session.backend,
        recipe=manifest.recipe if manifest is not None and session.backend != "eager" else "fp32",
        manifest_sha256=manifest_sha256(source.folder) if source.folder and session.backend != "eager" else "",
        slowfast=config.slowfast.spec, max_context=session.max_context, prefill_chunk=chunk, encoder_batch=batch,
        frame_counts=counts, text_tokens=parts.text_tokens, kv_dtype=kv_dtype, kv_bytes_per_token=kv_per_token)
    machine = Machine(cpu=cpu_model(), cores=_cores(), threads=torch.get_num_threads(),
                      read_gb_s=float(limits.get("read_gb_s", 0.0)), copy_gb_s=float(limits.get("copy_gb_s", 0.0)),
                      matmul_gflop_s=float(limits.get("matmul_gflop_s", 0.0)), hostname=socket.gethostname())
    return DeviceProfile(schema=SCHEMA, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         machine=machine, model=model, fits=fits, rss_start_bytes=rss_start, rss_loaded_bytes=rss_loaded,
                         frames=tuple(frames), max_position=position, measured=tuple(measured), provenance=provenance())


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def main() -> int:
    from sfedge.benchmarks.worker import serve_one_job

    return serve_one_job(lambda job: measure(ProfileJob.from_dict(job)).to_dict())


if __name__ == "__main__":
    sys.exit(main())
