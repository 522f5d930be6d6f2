"""Measure a device profile (benchmarks/costmodel.py): one fresh process per frame count
(``python -m sfedge.benchmarks.profiler`` reads a JSON job on stdin and prints one JSON line on stdout,
progress on stderr, like benchmarks/worker.py); the parent merges the points and fits the lines.

Each process runs what a real run at that frame count runs, in the pipeline's order, with direct
session calls so every piece is timed: decode + preprocess the video, the vision encoder call by call
(``Pipeline.encode_frames``), the projector; then the LLM: the prefill of the spliced prompt in the
export's chunks (every chunk is a timing at its position) and a few decode steps there. The peak RSS
of each of the two phases (sampled, corrected with VmHWM: sfedge.memory.StageMeter) is a fresh
process's peak at that frame count, as `sfedge bench` measures it, so the memory lines are fitted on
the quantity they predict (one process for all counts would keep the earlier counts' projectors,
arenas and features). The vision phase holds the frames, pixels and features (it grows with frames);
the LLM phase holds the KV cache and the prefill's buffers (they grow with the context, the positions
in the cache). The process of the largest count then continues the prefill to twice its context for
the attention slope, so larger frame counts are interpolated; that continuation is metered too and
gives the LLM phase's memory a point at twice the context from the same process (the counts' own
contexts lie within ~10 % of each other when the slow pathway's tokens dominate, too close for a
slope). A profile costs about one prefill per count plus one at twice the largest context.
"""
from __future__ import annotations

import dataclasses
import datetime
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from sfedge.benchmarks.cases import Source
from sfedge.benchmarks.costmodel import (KV_BYTES_PER_VALUE, SCHEMA, DeviceProfile, Machine, ProfiledModel, fit_linear,
                                         manifest_sha256)
from sfedge.errors import SfedgeError

PROFILER_MODULE = "sfedge.benchmarks.profiler"
EAGER_CHUNK = 128  # the eager model prefills in one call; the profile times it in chunks of at most this many tokens
MIN_PREFILL_POINTS = 8  # eager: chunks small enough for this many timings up to the largest context
DECODE_STEPS = 8  # decode steps timed at each frame count's context
POINT_NAMES = ("video", "encode", "projector", "prefill", "decode")


@dataclass(frozen=True)
class ProfileJob:
    source: Source
    video: str
    frames: tuple  # every count of the profile (the eager preset is built for the largest)
    threads: Optional[int] = None
    repeats: int = 3
    gen_tokens: int = 32
    seed: int = 0
    verify: bool = True
    limits: Optional[dict] = None  # measured by the caller in its own worker (keeps the profile's RSS clean)
    count: int = 0  # the one frame count a worker process measures
    extend: bool = False  # continue the prefill to twice this count's context

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict) -> "ProfileJob":
        return ProfileJob(**{**data, "source": Source(**data["source"]), "frames": tuple(data["frames"])})


@dataclass(frozen=True)
class CountMeasurement:
    """What one worker process measured at one frame count."""

    model: ProfiledModel
    threads: int
    rss_start_bytes: int
    rss_loaded_bytes: int
    peak_rss_bytes: int  # VmHWM after the prompt's prefill and decode steps, before any extension
    vision_bytes: float  # peak of the vision phase (video, encoder, projector) - rss_start
    # (positions in the KV cache, peak of the LLM phase - rss_start - KV bytes of those positions): after the
    # prompt's prefill + decode steps, and for the extending process after the continuation too
    llm_points: List[Tuple[float, float]]
    max_position: int
    points: Dict[str, List[Tuple[float, float]]]  # POINT_NAMES -> (x, y)
    row: dict = field(default_factory=dict)  # the measured stage times at this count (plotted by `sfedge plan`)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict) -> "CountMeasurement":
        model = dict(data["model"])
        model["frame_counts"] = tuple(model["frame_counts"])
        points = {name: [tuple(p) for p in data["points"][name]] for name in POINT_NAMES}
        return CountMeasurement(**{**data, "model": ProfiledModel(**model), "points": points,
                                   "llm_points": [tuple(p) for p in data["llm_points"]]})


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _timed(fn):
    start = time.perf_counter_ns()
    out = fn()
    return out, (time.perf_counter_ns() - start) / 1e6


def _median(fn, repeats: int):
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


def measure_count(job: ProfileJob) -> CountMeasurement:
    """One frame count in this (fresh) process; see the module docstring."""
    import torch

    from sfedge.budget import DEFAULT_QUESTION
    from sfedge.memory import RssSampler, StageMeter, current_rss
    from sfedge.prompt import tokenize_prompt
    from sfedge.runtime.stats import peak_rss_bytes
    from sfedge.runtime.video import load_video, preprocess

    if job.threads:
        torch.set_num_threads(job.threads)
    n, source = job.count, job.source
    rss_start = peak_rss_bytes()  # the interpreter and its imports: the base both phases' peaks are measured from
    pipeline = _pipeline(job)
    rss_loaded = current_rss()  # informational: what opening the folder left resident (lazy backends load more later)
    session, config = pipeline.session, pipeline.config
    counts = tuple(session.frame_counts)
    parts = tokenize_prompt(pipeline.tokenizer, DEFAULT_QUESTION, config.prompt_template)
    points: Dict[str, list] = {name: [] for name in POINT_NAMES}
    row: dict = {"frames": n}
    with RssSampler() as sampler:
        meter = StageMeter(sampler)
        meter.begin()
        visual = _vision_phase(job, pipeline, points, row, load_video, preprocess)
        vision_peak = meter.end().peak_bytes
        meter.begin()
        llm = _llm_phase(job, pipeline, parts, visual, points, row)
        llm_peak = meter.end().peak_bytes
        peak = peak_rss_bytes()
        _log(f"  {n} frames: encode {row['vision_encode_ms']:.1f} ms, prefill {row['context']} tokens "
             f"{row['prefill_ms_to_here'] / 1e3:.1f} s, decode {row['decode_ms_per_token']:.2f} ms/token, peak RSS "
             f"{peak / 2**20:.0f} MiB (vision phase {vision_peak / 2**20:.0f}, LLM phase {llm_peak / 2**20:.0f})")
        row.update({"peak_rss_bytes": peak, "vision_peak_rss_bytes": vision_peak, "llm_peak_rss_bytes": llm_peak})
        beyond_kv = lambda bytes_, positions: bytes_ - rss_start - llm.kv_per_token * positions  # noqa: E731
        llm_points = [(llm.position, beyond_kv(llm_peak, llm.position))]
        if job.extend:  # the attention slope needs a long line: larger counts are then interpolated, not extrapolated
            meter.begin()
            llm.extend()
            extended_peak = meter.end().peak_bytes
            llm_points.append((llm.position, beyond_kv(extended_peak, llm.position)))
            row["extended_peak_rss_bytes"] = extended_peak
    manifest = session.manifest
    model = ProfiledModel(
        label=source.label, preset=config.name, backend=session.backend,
        recipe=manifest.recipe if manifest is not None and session.backend != "eager" else "fp32",
        manifest_sha256=manifest_sha256(source.folder) if source.folder and session.backend != "eager" else "",
        slowfast=config.slowfast.spec, max_context=session.max_context, prefill_chunk=llm.chunk,
        encoder_batch=session.encoder_batch or 0, frame_counts=counts, text_tokens=parts.text_tokens, kv_dtype=llm.kv_dtype,
        kv_bytes_per_token=llm.kv_per_token)
    return CountMeasurement(model=model, threads=torch.get_num_threads(), rss_start_bytes=rss_start,
                            rss_loaded_bytes=rss_loaded, peak_rss_bytes=peak, vision_bytes=vision_peak - rss_start,
                            llm_points=llm_points, max_position=llm.position, points=points, row=row)


def _vision_phase(job: ProfileJob, pipeline, points: dict, row: dict, load_video, preprocess):
    """Video decode + preprocess, the encoder call by call, the projector (where the export has one for this
    count): the visual embeddings, or None (the prompt is then filler of the true length)."""
    import torch

    session, config, n = pipeline.session, pipeline.config, job.count

    def video():
        decoded = load_video(job.video, config.vision.frame_size, n)
        pixels = preprocess(decoded.frames, config.vision.pixel_mean, config.vision.pixel_std)
        return pixels[torch.arange(n) % pixels.shape[0]]  # a short video repeats frames, as static exports do

    pixels, video_ms = _median(video, job.repeats)
    points["video"].append((n, video_ms))
    pipeline.encode_frames(pixels[:session.encoder_batch or 1])  # warm-up; a 1B frame takes seconds, each call is timed once
    encode_calls: list = []
    features = pipeline.encode_frames(pixels, encode_calls)
    del pixels  # as Pipeline.encode_video: the projector runs without them
    points["encode"].extend(encode_calls)
    row.update({"video_ms": video_ms, "vision_encode_ms": sum(ms for _, ms in encode_calls)})
    if session.frame_counts and n not in session.frame_counts:
        return None
    visual, project_ms = _median(lambda: session.project(features), job.repeats)
    points["projector"].append((n, project_ms))
    row["projector_ms"] = project_ms
    return visual


class _LlmPhase:
    """The prompt's prefill in the export's chunks and decode steps, at a running cache position."""

    def __init__(self, job: ProfileJob, pipeline, points: dict, text_tokens: int):
        import torch

        from sfedge.budget import visual_token_counts
        from sfedge.runtime.sampling import Sampler, SamplingConfig

        self.session, self.points = pipeline.session, points
        self.one_token = torch.tensor([0], dtype=torch.long)
        config = pipeline.config
        self.chunk = self.session.max_prefill_chunk
        if self.session.backend == "eager":
            _, slow, fast = visual_token_counts(config, max(job.frames))
            self.chunk = max(1, min(self.chunk, EAGER_CHUNK, -(-(slow + fast + text_tokens) // MIN_PREFILL_POINTS)))
        generator = torch.Generator().manual_seed(job.seed)
        self.filler = self.session.embed(torch.randint(0, config.llm.vocab_size, (self.chunk,), generator=generator))
        self.kv_dtype = _kv_dtype(self.session)
        self.kv_per_token = config.llm.kv_bytes_per_token(KV_BYTES_PER_VALUE.get(self.kv_dtype, 4))
        self.sampler = Sampler(SamplingConfig())
        self.position = 0

    def warm_up(self) -> None:
        for _ in range(2):  # a chunk, then single steps
            self.session.decode(self.filler, 0)
            for step in range(DECODE_STEPS):
                self.session.decode(self.filler[:1], self.chunk + step)
            self.session.reset()

    def decode_here(self) -> float:
        """DECODE_STEPS timed decode steps at the current position; one (position, median) point."""
        start, times = self.position, []
        for _ in range(DECODE_STEPS):
            # as generate() does per token: sample from the logits, embed the token, decode it
            _, ms = _timed(lambda: self.sampler(self.session.decode(self.session.embed(self.one_token), self.position)))
            times.append(ms)
            self.position += 1
        median = sorted(times)[len(times) // 2]
        self.points["decode"].append((start + (DECODE_STEPS - 1) / 2, median))
        return median

    def prefill(self, embeds, until: int) -> float:
        """From the current position up to ``until`` (``embeds`` from its start, or the filler chunk where it is
        None); ms in total."""
        total, offset = 0.0, 0
        while self.position < until:
            take = min(self.chunk, until - self.position)
            piece = self.filler[:take] if embeds is None else embeds[offset:offset + take]
            _, ms = _timed(lambda: self.session.decode(piece, self.position))
            self.points["prefill"].append((self.position + (take - 1) / 2, ms / take))
            total += ms
            self.position += take
            offset += take
        return total

    def extend(self) -> None:
        target = min(2 * self.position, self.session.max_context - DECODE_STEPS)
        self.prefill(None, target)
        if self.position + DECODE_STEPS <= self.session.max_context:
            self.decode_here()
        _log(f"  prefill continued to position {self.position}")


def _llm_phase(job: ProfileJob, pipeline, parts, visual, points: dict, row: dict) -> _LlmPhase:
    """As Pipeline.prepare + generate: embed the text, splice, prefill, decode; the phase stays open for extend()."""
    import torch

    from sfedge.budget import visual_token_counts

    session, n = pipeline.session, job.count
    ids = lambda tokens: torch.tensor(tokens, dtype=torch.long)  # noqa: E731
    (before, after), embed_ms = _median(lambda: (session.embed(ids(parts.before)), session.embed(ids(parts.after))), job.repeats)
    row["embed_ms"] = embed_ms
    if visual is not None:
        embeds = torch.cat([before, visual.to(before.dtype), after])  # as Pipeline.prepare splices the prompt
        context = embeds.shape[0]
    else:
        _, slow, fast = visual_token_counts(pipeline.config, n)
        embeds, context = None, slow + fast + parts.text_tokens
    if context + DECODE_STEPS > session.max_context:
        raise SfedgeError(f"{job.source.label}: {n} frames need a context of {context + DECODE_STEPS} but the export holds "
                          f"{session.max_context}; profile fewer frames or re-export with a larger --max-context")
    llm = _LlmPhase(job, pipeline, points, parts.text_tokens)
    llm.warm_up()
    llm.decode_here()  # the short-context end of the decode line, then the run starts over at position 0
    session.reset()
    llm.position = 0
    prefill_ms = llm.prefill(embeds, context)
    decode_ms = llm.decode_here()
    row.update({"visual_tokens": context - parts.text_tokens, "context": context, "prefill_ms_to_here": prefill_ms,
                "decode_ms_per_token": decode_ms})
    return llm


def count_jobs(job: ProfileJob) -> List[ProfileJob]:
    frames = sorted(set(job.frames))
    return [dataclasses.replace(job, frames=tuple(frames), count=n, extend=n == frames[-1]) for n in frames]


def fit_profile(job: ProfileJob, parts: List[CountMeasurement]) -> DeviceProfile:
    """Merge the per-count measurements into one profile (pure arithmetic; tested on synthetic parts)."""
    from sfedge.benchmarks.provenance import cpu_model, provenance

    if not parts:
        raise SfedgeError("no frame count was measured")
    model = parts[0].model
    for part in parts[1:]:
        if dataclasses.replace(part.model, prefill_chunk=model.prefill_chunk) != model:
            raise SfedgeError(f"{model.label}: the worker processes saw different exports or settings")
    points = {name: [p for part in parts for p in part.points[name]] for name in POINT_NAMES}
    if not points["projector"]:
        raise SfedgeError(f"{model.label}: none of --frames {','.join(str(p.row['frames']) for p in parts)} has a projector "
                          f"in this export (it has {','.join(map(str, model.frame_counts))}); include one of those")
    frames = [part.row["frames"] for part in parts]
    fits = {
        "video_ms": fit_linear(points["video"], "frames", "ms", nonnegative_slope=True),
        "encode_call_ms": fit_linear(points["encode"], "frames_per_call", "ms", nonnegative_slope=True),
        "projector_ms": fit_linear(points["projector"], "frames", "ms", nonnegative_slope=True),
        "embed_ms": fit_linear([(model.text_tokens, sum(p.row["embed_ms"] for p in parts) / len(parts))], "text_tokens", "ms"),
        "prefill_ms_per_token": fit_linear(points["prefill"], "position", "ms_per_token", True, "constant"),
        "decode_ms_per_token": fit_linear(points["decode"], "position", "ms_per_token", True, "constant"),
        "vision_bytes": fit_linear(list(zip(frames, (p.vision_bytes for p in parts))), "frames", "bytes"),
        "llm_bytes": fit_linear([point for p in parts for point in p.llm_points], "context", "bytes"),
    }
    limits = job.limits or {}
    machine = Machine(cpu=cpu_model(), cores=_cores(), threads=parts[0].threads,
                      read_gb_s=float(limits.get("read_gb_s", 0.0)), copy_gb_s=float(limits.get("copy_gb_s", 0.0)),
                      matmul_gflop_s=float(limits.get("matmul_gflop_s", 0.0)), hostname=socket.gethostname())
    mean = lambda values: int(sum(values) / len(values))  # noqa: E731
    return DeviceProfile(schema=SCHEMA, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         machine=machine, model=model, fits=fits,
                         rss_start_bytes=mean([p.rss_start_bytes for p in parts]),
                         rss_loaded_bytes=mean([p.rss_loaded_bytes for p in parts]),
                         frames=tuple(frames), max_position=max(p.max_position for p in parts),
                         measured=tuple(p.row for p in parts), provenance=provenance())


def measure(job: ProfileJob, spawn: Callable[[dict], dict]) -> DeviceProfile:
    """Every count in its own process via ``spawn`` (job dict -> result dict), then the fits."""
    parts = []
    for count_job in count_jobs(job):
        result = spawn(count_job.to_dict())
        if result.get("status") == "failed":
            raise SfedgeError(f"profiling {job.source.label} at {count_job.count} frames failed: {result.get('note', '')}")
        parts.append(CountMeasurement.from_dict(result))
    return fit_profile(job, parts)


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def main() -> int:
    from sfedge.benchmarks.worker import serve_one_job

    return serve_one_job(lambda job: measure_count(ProfileJob.from_dict(job)).to_dict())


if __name__ == "__main__":
    sys.exit(main())
