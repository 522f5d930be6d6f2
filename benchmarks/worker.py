"""One benchmark case in a fresh process: ``python -m sfedge.benchmarks.worker`` reads a JSON job on
stdin and prints one JSON result on stdout (progress goes to stderr).

Jobs: {"kind": "case", "case": BenchCase}, {"kind": "limits", "threads": n}, and the peers' jobs
{"kind": "llm" | "transformers" | "executorch-runner" | "llama.cpp" | "llama.cpp-gguf", ...} (benchmarks/peers/).

Only the runtime is used (Pipeline.from_folder / Pipeline.from_preset, the session, generate), so
every backend is measured by the same code. Stage boundaries are observed through the RunStats
fields the pipeline writes (a subclass records the process's peak RSS as each stage's duration is
set), so the measured code path is exactly the one `sfedge run` takes.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Optional

from sfedge.benchmarks.cases import BenchCase
from sfedge.errors import SfedgeError, UsageError
from sfedge.runtime.stats import RunStats, now_ms, peak_rss_bytes

# RunStats field written at the end of each stage -> stage name
STAGE_FIELDS = {"video_decode_ms": "video_decode", "preprocess_ms": "preprocess", "vision_encode_ms": "vision_encode",
                "projector_ms": "projector", "embed_ms": "embed", "prefill_ms": "prefill", "decode_ms": "decode"}
FILLER_WORDS = ("the", "a", "video", "x")


class StageStats(RunStats):
    """RunStats that notes the process's peak RSS whenever a stage's duration is written."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        stage = STAGE_FIELDS.get(name)
        if stage is not None and "stage_peak_rss" in self.__dict__:
            self.stage_peak_rss[stage] = peak_rss_bytes()

    def __init__(self, **fields):
        self.__dict__["stage_peak_rss"] = {}
        super().__init__(**fields)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the prompt ------------------------------------------------------------------------------------

def question_for(tokenizer, template: str, prompt_tokens: Optional[int]) -> str:
    """The default question, or a filler question making the prompt's text exactly ``prompt_tokens``
    tokens (template + question; the visual tokens come on top)."""
    from sfedge.budget import DEFAULT_QUESTION
    from sfedge.prompt import tokenize_prompt

    if prompt_tokens is None:
        return DEFAULT_QUESTION
    count = lambda words: tokenize_prompt(tokenizer, " ".join(words), template).text_tokens  # noqa: E731
    for word in FILLER_WORDS:
        one, two, three = count([word]), count([word] * 2), count([word] * 3)
        if two - one == 1 and three - two == 1:
            words = prompt_tokens - one + 1
            if words < 1:
                raise UsageError(f"--prompt-tokens {prompt_tokens} is below this prompt template's minimum of {one} text tokens")
            question = " ".join([word] * words)
            if count([word] * words) == prompt_tokens:
                return question
    raise SfedgeError(f"could not build a question of exactly {prompt_tokens} prompt tokens with this tokenizer "
                      f"(filler words tried: {', '.join(FILLER_WORDS)})")


# --- building the pipeline ---------------------------------------------------------------------------

def build_pipeline(case: BenchCase):
    from sfedge.runtime.pipeline import Pipeline
    from sfedge.runtime.sessions import SessionOptions

    source = case.source
    if source.folder:
        from sfedge.runtime.pipeline import VideoOptions

        pipeline = Pipeline.from_folder(source.folder, SessionOptions(verify=case.verify, threads=case.threads), source.backend)
        pipeline.load_for_video(VideoOptions(max_frames=case.frames))  # in the load time, not in the first TTFT
        return pipeline
    from sfedge.budget import DEFAULT_QUESTION, compute_budget
    from sfedge.config import get_preset
    from sfedge.models import WeightsSource
    from sfedge.tokenizer import load_tokenizer
    from sfedge.prompt import tokenize_prompt

    config = get_preset(source.preset).with_slowfast(case.frames, case.slowfast)
    text_tokens = case.prompt_tokens
    if text_tokens is None:
        text_tokens = tokenize_prompt(load_tokenizer(config), DEFAULT_QUESTION, config.prompt_template).text_tokens
    budget = compute_budget(config, text_tokens, max_new_tokens=case.gen_tokens)
    if not budget.fits_context:
        raise SfedgeError(f"{case.key}: {budget.total_tokens} tokens do not fit {config.name}'s context of {budget.context}")
    margin = 16 + (32 if case.questions > 1 else 0)  # chat questions differ in length (benchmarks/chat_case.py)
    max_context = min(budget.total_tokens + margin, config.llm.max_context)
    return Pipeline.from_preset(config, WeightsSource(seed=case.seed), max_context)


def artifact_info(pipeline, folder: Optional[str]) -> tuple[dict, Optional[int], int]:
    """(bytes per component + total, bytes of the file(s) holding the text decoder, KV bytes per value)."""
    from pathlib import Path

    from sfedge.manifest import Component, decode_graph, path_bytes

    session = pipeline.session
    manifest = session.manifest
    if manifest is None or session.backend == "eager":
        return {}, None, 4
    sizes: dict = {}
    files: dict = {}

    def measured(names, fallback: int) -> int:
        for name in names:
            if name not in files:
                files[name] = path_bytes(Path(folder) / name) if folder and (Path(folder) / name).exists() else fallback
        return sum(files[name] for name in names)

    step_bytes = None  # a decoder with a decode graph (ONNX int8-channel-q4decode): a step reads that graph only
    for entry in manifest.components:
        total = measured([entry.file, *entry.extra.get("data_files", [])], entry.bytes)
        step = decode_graph(entry)
        if step is not None:
            step_bytes = measured([step.file, *step.data_files], step.bytes)
            total += step_bytes
        sizes[entry.component] = sizes.get(entry.component, 0) + total  # projectors: one file per frame count
    sizes["total"] = sum(files.values())
    decoder = manifest.component(Component.TEXT_DECODER)
    kv_bytes = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "int8": 1}.get(str(decoder.extra.get("kv_dtype", "fp32")), 4)
    decoder_bytes = step_bytes or sizes.get(Component.TEXT_DECODER.value)
    embedding = manifest.component(Component.TOKEN_EMBEDDING)
    if decoder_bytes and embedding.file == decoder.file:  # llm.pte: a decode step gathers one row of the table
        decoder_bytes -= int(embedding.extra.get("table_bytes", 0))
    return sizes, decoder_bytes, kv_bytes


# --- one case ----------------------------------------------------------------------------------------

def run_case(case: BenchCase) -> dict:
    import torch

    from sfedge.benchmarks.limits import Calibration
    from sfedge.prompt import tokenize_prompt
    from sfedge.runtime.generate import generate
    from sfedge.runtime.pipeline import VideoOptions
    from sfedge.runtime.sampling import Sampler, SamplingConfig

    if case.threads:
        torch.set_num_threads(case.threads)
    rss = {"start": peak_rss_bytes()}
    calibration = Calibration()
    calibration_before = calibration.measure_ms()
    pipeline = build_pipeline(case)
    rss["load"] = peak_rss_bytes()
    session, config = pipeline.session, pipeline.config
    question = question_for(pipeline.tokenizer, config.prompt_template, case.prompt_tokens)
    text_tokens = tokenize_prompt(pipeline.tokenizer, question, config.prompt_template).text_tokens
    video = VideoOptions(max_frames=case.frames)
    samples: dict = {}
    stage_rss: dict = {}
    constants: dict = {}
    total = case.warmup + case.repetitions
    if case.questions > 1 or case.realtime:  # video chat: benchmarks/chat_case.py
        from sfedge.benchmarks.chat_case import run_chat_rep

        for rep in range(total):
            label = "warm-up" if rep < case.warmup else f"rep {rep - case.warmup + 1}/{case.repetitions}"
            log(f"    {label}:")
            sample, constants = run_chat_rep(case, pipeline, question, log)
            if rep >= case.warmup:
                for name, value in sample.items():
                    samples.setdefault(name, []).append(value)
        rss["peak"] = peak_rss_bytes()
        return finish_record(case, pipeline, samples, constants, rss, stage_rss, calibration_before, calibration.measure_ms())
    for rep in range(total):
        stats = StageStats()
        stats.inference_start_ms = now_ms()
        embeds = pipeline.prepare(case.video, question, video, stats)
        if embeds.shape[0] + case.gen_tokens > session.max_context:
            raise SfedgeError(f"{case.key}: {embeds.shape[0]} prompt + {case.gen_tokens} generated tokens do not fit the "
                              f"context of {session.max_context}; lower --gen-tokens/--prompt-tokens or re-export with a "
                              "larger --max-context")
        generated = 0
        for _ in generate(session, embeds, Sampler(SamplingConfig()), case.gen_tokens, (), stats):
            generated += 1
            if case.inject_delay_ms and generated < case.gen_tokens:
                time.sleep(case.inject_delay_ms / 1e3)  # test hook: counted inside decode_ms
        origin = stats.inference_start_ms
        ttft = stats.first_token_ms - origin
        if rep == 0:
            stage_rss = dict(stats.stage_peak_rss)
        sample = {
            "video_decode_ms": stats.video_decode_ms, "preprocess_ms": stats.preprocess_ms,
            "vision_encode_ms": stats.vision_encode_ms, "vision_encode_ms_per_frame": stats.vision_encode_ms / max(stats.frames, 1),
            "projector_ms": stats.projector_ms, "embed_ms": stats.embed_ms, "prefill_ms": stats.prefill_ms,
            "prompt_eval_end_ms": stats.prompt_eval_end_ms - origin, "first_token_ms": ttft, "ttft_ms": ttft,
            "decode_ms": stats.decode_ms, "inference_end_ms": stats.inference_end_ms - origin,
            "aggregate_sampling_time_ms": stats.aggregate_sampling_time_ms,
            "prefill_tokens_per_s": stats.prefill_tokens_per_s, "decode_tokens_per_s": stats.decode_tokens_per_s,
            "decode_ms_per_token": stats.decode_ms / max(stats.num_generated_tokens - 1, 1),
        }
        sample["ttft_other_ms"] = ttft - sum(sample[k] for k in ("video_decode_ms", "preprocess_ms", "vision_encode_ms",
                                                                   "projector_ms", "embed_ms", "prefill_ms"))
        constants = {"frames": stats.frames, "visual_tokens": stats.visual_tokens, "text_tokens": text_tokens,
                     "num_prompt_tokens": stats.num_prompt_tokens, "num_generated_tokens": stats.num_generated_tokens}
        label = "warm-up" if rep < case.warmup else f"rep {rep - case.warmup + 1}/{case.repetitions}"
        log(f"    {label}: TTFT {ttft:.1f} ms, decode {stats.decode_tokens_per_s:.1f} tok/s")
        if rep >= case.warmup:
            for name, value in sample.items():
                samples.setdefault(name, []).append(value)
    rss["peak"] = peak_rss_bytes()
    calibration_after = calibration.measure_ms()
    return finish_record(case, pipeline, samples, constants, rss, stage_rss, calibration_before, calibration_after)


def finish_record(case, pipeline, samples, constants, rss, stage_rss, before, after) -> dict:
    from sfedge.benchmarks.roofline import compute_work
    from sfedge.benchmarks.summary import summarize_all
    from sfedge.params import count_parameters

    import torch

    session, config = pipeline.session, pipeline.config
    manifest = session.manifest
    sizes, decoder_bytes, kv_bytes = artifact_info(pipeline, case.source.folder)
    counts = count_parameters(config)  # on the meta device, after all measurements
    work = compute_work(config, counts, constants["num_prompt_tokens"], constants["num_generated_tokens"],
                        constants["frames"], decoder_bytes, kv_bytes, session.max_prefill_chunk)
    return {
        "key": case.key, "name": case.name, "source": case.source.label, "status": "ok", "note": "",
        "case": case.to_dict(),
        "model": {"preset": config.name, "backend": session.backend, "recipe": manifest.recipe if manifest and session.backend != "eager" else "fp32",
                  "slowfast": config.slowfast.spec, "max_context": session.max_context,
                  "prefill_chunk": session.max_prefill_chunk, "parameters": counts},
        **constants,
        "threads": case.threads or torch.get_num_threads(),
        "model_load_ms": pipeline.load_ms,
        "metrics": summarize_all(samples), "samples": samples,
        "peak_rss_bytes": rss["peak"], "rss_bytes": {"start": rss["start"], "load": rss["load"], **stage_rss},
        "artifact_bytes": sizes,
        "calibration_ms": {"before": before, "after": after, "mean": (before + after) / 2},
        "work": work.to_dict(),
    }


def run_limits(job: dict) -> dict:
    import torch

    from sfedge.benchmarks.limits import measure_limits

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    return measure_limits().to_dict()


def dispatch(job: dict) -> dict:
    kind = job.get("kind")
    if kind == "case":
        return run_case(BenchCase.from_dict(job["case"]))
    if kind == "limits":
        return run_limits(job)
    from sfedge.benchmarks import peers

    if peers.handles(kind):
        return peers.run_job(job)
    raise UsageError(f"unknown worker job kind {kind!r}; known: case, limits, {', '.join(peers.JOBS)}")


def serve_one_job(handle) -> int:
    """A worker process's protocol: one JSON job on stdin -> ``handle(job)`` -> one JSON result on stdout
    (an SfedgeError becomes {"status": "failed", "note": ...} and exit code 1)."""
    try:
        result, code = handle(json.loads(sys.stdin.read())), 0
    except SfedgeError as exc:
        result, code = {"status": "failed", "note": str(exc)}, 1
    print(json.dumps(result), flush=True)
    return code


def main() -> int:
    return serve_one_job(dispatch)


if __name__ == "__main__":
    sys.exit(main())
