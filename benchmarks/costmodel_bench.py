"""`sfedge bench` options of the cost model and of Ray sweeps, kept out of sfedge/cli/bench.py:
``--profile-out FILE`` (measure a device profile), ``--validate FILE`` (predicted vs measured per
stage), ``--ray [auto|ADDRESS]`` and ``--ray-resource device:NAME``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from sfedge.errors import SfedgeError, UsageError

DEFAULT_PRESET_FRAMES = (4, 16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cost model and Ray sweeps (docs/cost_model.md)")
    group.add_argument("--profile-out", metavar="FILE",
                       help="measure a device profile of the one DIR (or --model PRESET) at --frames (default: the export's "
                            "counts and half the first; a preset: 4,16) and write it here, instead of the cases")
    group.add_argument("--validate", metavar="PROFILE",
                       help="run the cases, then print predicted (from PROFILE) vs measured per stage with the error in %%")
    group.add_argument("--results", metavar="BENCH_JSON",
                       help="with --validate: compare the profile with the stored results of an earlier run (its --plot DIR's "
                            "bench.json, or --output json) instead of running the cases")
    group.add_argument("--ray", nargs="?", const="local", metavar="auto|ADDRESS",
                       help="run each case as a Ray task in a fresh worker (local instance without a value; 'auto' or "
                            "HOST:PORT joins a cluster); needs pip install 'sfedge[ray]'")
    group.add_argument("--ray-resource", metavar="device:NAME", help="with --ray: only nodes that have this custom resource")


def executor(args: argparse.Namespace):
    """None (local subprocesses) or a RayExecutor."""
    from sfedge.benchmarks.ray_runner import RayExecutor, parse_resource

    resource = parse_resource(args.ray_resource)
    if args.ray is None:
        if resource:
            raise UsageError("--ray-resource needs --ray")
        return None
    return RayExecutor(address=args.ray, resource=resource)


# --- --profile-out ---------------------------------------------------------------------------------

def profile_frames(source, requested: List[Optional[int]]) -> List[int]:
    from sfedge.benchmarks.cases import folder_frames

    asked = [f for f in requested if f]
    if asked:
        return sorted(set(asked))
    if source.folder:
        counts = folder_frames(source.folder)
        return sorted(set(counts) | {max(1, counts[0] // 2)})
    return list(DEFAULT_PRESET_FRAMES)


def profile_out(args: argparse.Namespace, sweep, progress=None) -> int:
    from sfedge.benchmarks.profiler import PROFILER_MODULE, ProfileJob, measure
    from sfedge.benchmarks.runner import _progress, measure_limits, spawn_worker

    progress = progress or _progress
    if len(sweep.sources) != 1:
        raise UsageError("--profile-out profiles one artifact folder (or one --model preset) at a time")
    source = sweep.sources[0]
    threads = sweep.threads[0]
    limits = None if args.no_limits else measure_limits(threads, progress)
    frames = profile_frames(source, list(sweep.frames))
    job = ProfileJob(source=source, video=sweep.video, frames=tuple(frames), threads=threads, repeats=max(args.repetitions, 1),
                     seed=args.seed, verify=not args.no_verify, limits=limits)
    progress(f"profiling {source.label} at {','.join(map(str, frames))} frames, one fresh process per count ...")
    profile = measure(job, lambda count_job: spawn_worker(count_job, progress, module=PROFILER_MODULE))
    Path(args.profile_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.profile_out).write_text(profile.to_json())
    from sfedge.benchmarks.costmodel import load_profile

    print(format_fits(load_profile(args.profile_out)))
    print(f"wrote {args.profile_out}", file=sys.stderr)
    return 0


def format_fits(profile) -> str:
    m = profile.machine
    lines = [f"device profile of {profile.model.label} ({profile.model.backend} {profile.model.recipe}) on {m.cpu}, "
             f"{m.threads} thread(s) of {m.cores}; read {m.read_gb_s:.1f} GB/s, matmul {m.matmul_gflop_s:.0f} GFLOP/s",
             "| fit | intercept | slope | x | points | x range | rms residual |", "|---|---|---|---|---|---|---|"]
    for name, fit in profile.fits.items():
        lines.append(f"| {name} | {fit.intercept:.4g} | {fit.slope:.4g} | {fit.x} | {len(fit.points)} | "
                     f"{fit.x_min:g}-{fit.x_max:g} | {fit.rms_residual:.3g} ({fit.relative_rms:.0%}){' ' + fit.note if fit.note else ''} |")
    lines.append(f"base (interpreter + imports) {profile.rss_start_bytes / 2**20:.0f} MiB, resident after opening the folder "
                 f"{profile.resident_bytes / 2**20:.0f} MiB, KV {profile.model.kv_bytes_per_token} bytes/token "
                 f"({profile.model.kv_dtype}), positions measured up to {profile.max_position}")
    return "\n".join(lines)


def load_validation_profile(args: argparse.Namespace):
    from sfedge.benchmarks.costmodel import load_profile

    if args.profile_out and args.validate:
        raise UsageError("--profile-out and --validate do not go together: profile first, then validate")
    return load_profile(args.validate) if args.validate else None


# --- --validate ------------------------------------------------------------------------------------

def validate_stored(args: argparse.Namespace) -> int:
    """``--validate PROFILE --results BENCH_JSON``: the validation table of stored runs (no case is run)."""
    from sfedge.benchmarks.costmodel import load_profile
    from sfedge.benchmarks.runner import load_document

    if not args.validate:
        raise UsageError("--results needs --validate PROFILE")
    if args.artifacts or args.model:
        raise UsageError("--results validates stored runs: pass no DIR or --model")
    document = load_document(args.results)
    profile = load_profile(args.validate)
    for record in document["results"]:
        if record.get("status") != "ok":
            continue
        model, measured = record["model"], profile.model
        ran = (model["preset"], model["backend"], model.get("recipe") or "fp32")
        if ran != (measured.preset, measured.backend, measured.recipe):
            raise SfedgeError(f"{args.results}: case {record['key']} ran {' '.join(ran)}, but {args.validate} was measured on "
                              f"{measured.preset} {measured.backend} {measured.recipe}")
    print(validation_table(profile, args.validate, document))
    return 0


def check_profile_applies(profile, path: str, sources) -> None:
    from sfedge.benchmarks.costmodel import check_applies_to_folder, check_applies_to_preset

    for source in sources:
        if source.folder:
            check_applies_to_folder(profile, source.folder, source.backend, path)
        else:
            check_applies_to_preset(profile, source.preset, path)
            if profile.model.backend != "eager":
                raise SfedgeError(f"{path} was measured on backend {profile.model.backend}, not eager ({source.label})")


def validation_rows(profile, record: dict) -> tuple:
    """([(stage, predicted, measured, unit)], extrapolation warnings) for one benchmark record."""
    from sfedge.benchmarks.costmodel import predict

    metrics = record["metrics"]
    mean = lambda name: metrics[name]["mean"]  # noqa: E731
    prediction = predict(profile, record["frames"], record["visual_tokens"], record["model"]["slowfast"],
                         record["text_tokens"], record["num_generated_tokens"])
    stages = prediction.stages_ms
    rows = [("video", stages["video"], mean("video_decode_ms") + mean("preprocess_ms"), "ms"),
            ("vision_encode", stages["vision_encode"], mean("vision_encode_ms"), "ms"),
            ("projector", stages["projector"], mean("projector_ms"), "ms"),
            ("embed", stages["embed"], mean("embed_ms"), "ms"),
            ("prefill", stages["prefill"], mean("prefill_ms"), "ms"),
            ("TTFT", prediction.ttft_ms, mean("ttft_ms"), "ms"),
            ("decode", prediction.decode_tokens_per_s, mean("decode_tokens_per_s"), "tok/s"),
            ("peak RSS", prediction.peak_rss_bytes / 2**20, record["peak_rss_bytes"] / 2**20, "MiB")]
    return rows, prediction.warnings


def validation_table(profile, path: str, document: dict) -> str:
    lines = [f"predicted from {path} ({profile.model.label}, profiled at {','.join(map(str, profile.frames))} frames) "
             "vs measured (mean)", "| case | stage | predicted | measured | error |", "|---|---|---|---|---|"]
    for record in document["results"]:
        if record.get("status") != "ok":
            continue
        rows, warnings = validation_rows(profile, record)
        for stage, predicted, measured, unit in rows:
            error = (predicted - measured) / measured * 100 if measured else float("nan")
            lines.append(f"| {record['key']} | {stage} | {predicted:,.1f} {unit} | {measured:,.1f} {unit} | {error:+.0f}% |")
        for warning in warnings:
            lines.append(f"| {record['key']} | EXTRAPOLATED | {warning} | | |")
    return "\n".join(lines)
