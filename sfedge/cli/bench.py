"""Benchmark artifact folders of any backend and the eager model: per-stage latency (video decode,
preprocess, vision encode, projector, prefill, TTFT, decode), peak RSS per stage, artifact bytes,
roofline shares; llama-bench style sweeps; md/csv/json/jsonl; PNG plots; a CI regression gate.

    sfedge bench --model tiny                                   (eager model, random weights)
    sfedge bench out/tiny_executorch_8da4w out/tiny_onnx_int8 -r 10 --gen-tokens 64
    sfedge bench --model tiny --frames 4,8,16 --prompt-tokens 64,256 --threads 1,2 --output csv
    sfedge bench --model sf-llava-1.5-1b --frames 8,32,128 -r 1 --plot plots/   (true shapes: slow)
    sfedge bench out/x --save-baseline base.json ;  sfedge bench out/x --baseline base.json --max-regression 10%

Each case runs in a fresh process (python -m sfedge.benchmarks.worker). See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

DEFAULT_GEN_TOKENS = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sfedge.benchmarks.printers import PRINTERS
    from sfedge.benchmarks.cases import BenchCase
    from sfedge.config import PRESETS

    defaults = BenchCase(source=None, video="")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the examples' line breaks
    parser.add_argument("artifacts", nargs="*", metavar="DIR", help="artifact folders written by `sfedge export`")
    parser.add_argument("--model", metavar="PRESET[,PRESET]",
                        help=f"also benchmark the eager model of these presets (random weights): {', '.join(PRESETS)}")
    parser.add_argument("--backend", help="with DIR: run this backend on the folders instead, e.g. eager (the reference)")
    parser.add_argument("--video", help="video to benchmark with (default: a 10 s synthetic clip written to a temp folder)")
    sweep = parser.add_argument_group("sweeps (comma-separated lists, llama-bench style)")
    sweep.add_argument("--frames", metavar="N[,N]", help="frames sampled per video (a folder: the counts it has projectors for, see `sfedge export --frames`)")
    sweep.add_argument("--slowfast", metavar="SPEC[,SPEC]", help="SF-LLaVA SlowFast specs; eager presets only")
    sweep.add_argument("--prompt-tokens", metavar="N[,N]",
                       help="text tokens of the prompt (template + a filler question); visual tokens come on top "
                            "(default: the template with 'What happens in the video?')")
    sweep.add_argument("--gen-tokens", metavar="N[,N]", default=str(DEFAULT_GEN_TOKENS), help="tokens to decode")
    sweep.add_argument("--threads", metavar="N[,N]", help="CPU threads (default: the backend's default)")
    run = parser.add_argument_group("repetitions")
    run.add_argument("-r", "--repetitions", type=int, default=defaults.repetitions, help="measured repetitions per case")
    run.add_argument("--warmup", type=int, default=defaults.warmup, help="unmeasured warm-up runs per case")
    run.add_argument("--seed", type=int, default=defaults.seed, help="seed of the eager model's random weights")
    run.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifacts")
    run.add_argument("--no-limits", action="store_true", help="skip measuring memory bandwidth and matmul FLOP/s")
    run.add_argument("--list", action="store_true", help="print the cases the sweep expands to and exit")
    chat = parser.add_argument_group("video chat (docs/video_chat.md)")
    chat.add_argument("--questions", type=int, default=1, metavar="N",
                      help="open the video once and ask N questions; reports TTFT and decode per question")
    chat.add_argument("--realtime", action="store_true",
                      help="replay the video at its frame rate, encoding frames as they arrive; TTFT from the question after the last frame")
    out = parser.add_argument_group("output")
    out.add_argument("--output", choices=PRINTERS.names(), default="md", help="result format (default: md)")
    out.add_argument("--out", metavar="FILE", help="write the results here instead of stdout")
    out.add_argument("--plot", metavar="DIR", help="write PNG plots, plus bench.json/.csv/.md, into DIR")
    gate = parser.add_argument_group("regression gate")
    gate.add_argument("--save-baseline", metavar="FILE", help="save this run as a baseline (JSON)")
    gate.add_argument("--baseline", metavar="FILE", help="compare with this baseline; exit 1 on a regression")
    gate.add_argument("--max-regression", default="10%",
                      help="slowdown that fails the gate, above 0%% and at most 1000%% (default: 10%%)")
    gate.add_argument("--allow-missing", action="store_true",
                      help="only report baseline cases that did not run (default: they fail the gate)")
    gate.add_argument("--allow-inconclusive", action="store_true",
                      help="only report metrics whose noise is too large to decide (default: they fail the gate; "
                           "the report says how many repetitions would decide)")
    gate.add_argument("--inject-delay-ms", type=float, default=0.0,
                      help="test hook: sleep this long in every decode step (to check that the gate catches a slowdown)")
    from sfedge.benchmarks import costmodel_bench

    costmodel_bench.add_arguments(parser)


def _sources(args):
    from sfedge.benchmarks.cases import Source, parse_str_list
    from sfedge.config import get_preset
    from sfedge.errors import UsageError
    from sfedge.manifest import read_manifest

    if args.backend and not args.artifacts:
        raise UsageError("--backend applies to artifact folders (DIR); for the eager model of a preset use --model")
    sources = []
    for folder in args.artifacts:
        read_manifest(folder)  # fail fast on a wrong path
        sources.append(Source(folder=str(folder), backend=args.backend))
    for preset in parse_str_list(args.model):
        if preset:
            get_preset(preset)
            sources.append(Source(preset=preset))
    if not sources:
        raise UsageError("pass artifact folders (DIR ...) and/or --model PRESET")
    return sources


def _check(args) -> None:
    from sfedge.errors import UsageError

    if args.repetitions < 1 or args.warmup < 0:
        raise UsageError(f"--repetitions must be >= 1 and --warmup >= 0 (got {args.repetitions}, {args.warmup})")
    if args.inject_delay_ms < 0:
        raise UsageError(f"--inject-delay-ms must be >= 0, got {args.inject_delay_ms}")
    if args.questions < 1 or (args.realtime and args.questions != 1):
        raise UsageError(f"--questions must be >= 1 (and 1 with --realtime), got {args.questions}")
    if args.video and not Path(args.video).is_file():
        raise UsageError(f"--video {args.video} is not a file")
    if (args.allow_missing or args.allow_inconclusive) and not args.baseline:
        raise UsageError("--allow-missing and --allow-inconclusive apply to the gate: pass --baseline FILE")
    if args.baseline and not Path(args.baseline).is_file():
        raise UsageError(f"--baseline {args.baseline} is not a file (write one with --save-baseline FILE)")
    if args.save_baseline:
        _check_writable("--save-baseline", args.save_baseline)


def _check_writable(flag: str, path: str) -> None:
    """Before any work: a path the results can be written to (the run is lost otherwise)."""
    import os

    from sfedge.errors import UsageError

    target = Path(path)
    if not str(path).strip() or target.is_dir():
        raise UsageError(f"{flag} {path!r} must name a file, not a folder")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")


def _write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def run(args: argparse.Namespace) -> int:
    from sfedge.benchmarks.cases import Sweep, parse_int_list, parse_str_list
    from sfedge.benchmarks.gate import check_baseline, compare, parse_threshold
    from sfedge.benchmarks.printers import render
    from sfedge.benchmarks import costmodel_bench
    from sfedge.benchmarks.runner import load_document, run_sweep
    from sfedge.runtime.video import make_demo_video

    if args.results:
        return costmodel_bench.validate_stored(args)
    _check(args)
    profile = costmodel_bench.load_validation_profile(args)
    threshold = parse_threshold(args.max_regression)
    baseline = load_document(args.baseline) if args.baseline else None
    if baseline is not None:
        check_baseline(baseline, args.baseline)
    sources = _sources(args)
    slowfast = parse_str_list(args.slowfast)
    frames = parse_int_list(args.frames, "--frames")
    with tempfile.TemporaryDirectory(prefix="sfedge-bench-") as tmp:
        video = args.video or str(make_demo_video(Path(tmp) / "bench.mp4", seconds=10.0, fps=12, size=160))
        sweep = Sweep(sources=sources, video=str(Path(video).resolve()), frames=frames, slowfast=slowfast,
                      prompt_tokens=parse_int_list(args.prompt_tokens, "--prompt-tokens"),
                      gen_tokens=[g for g in parse_int_list(args.gen_tokens, "--gen-tokens") if g],
                      threads=parse_int_list(args.threads, "--threads"), repetitions=args.repetitions,
                      warmup=args.warmup, seed=args.seed, inject_delay_ms=args.inject_delay_ms, verify=not args.no_verify,
                      questions=args.questions, realtime=args.realtime)
        if args.list:
            for case in sweep.expand():
                print(case.key)
            for note in sweep.notes:
                print(f"note: {note}", file=sys.stderr)
            if args.plot:
                _plots(args.plot, {"results": []}, sources, slowfast, frames)
            return 0
        if args.profile_out:
            return costmodel_bench.profile_out(args, sweep)
        if profile is not None:
            costmodel_bench.check_profile_applies(profile, args.validate, sources)
        executor = costmodel_bench.executor(args)
        document = run_sweep(sweep, with_limits=not args.no_limits, executor=executor)
    text = render(document, args.output)
    if args.out:
        _write(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.plot:
        _plots(args.plot, document, sources, slowfast, frames)
    if profile is not None:
        print(costmodel_bench.validation_table(profile, args.validate, document))
    if args.save_baseline:
        _write(args.save_baseline, render(document, "json"))
        print(f"saved baseline {args.save_baseline}", file=sys.stderr)
    code = 0
    failed = [r["key"] for r in document["results"] if r.get("status") != "ok"]
    if failed:
        print(f"{len(failed)} case(s) failed: {', '.join(failed)}", file=sys.stderr)
        code = 1
    if baseline is not None:
        report = compare(baseline, document, threshold, allow_missing=args.allow_missing,
                         allow_inconclusive=args.allow_inconclusive)
        print(report.table(), file=sys.stderr)
        if not report.passed:
            code = 1
    return code


def _plots(folder: str, document: dict, sources, slowfast, frames) -> None:
    from sfedge.benchmarks.plots import budget_models, write_plots
    from sfedge.benchmarks.printers import render

    written = write_plots(document, Path(folder), budget_models(sources, slowfast), [f for f in frames if f])
    if document.get("results"):
        for fmt in ("json", "csv", "md"):
            _write(str(Path(folder) / f"bench.{fmt}"), render(document, fmt))
    print(f"plots: {', '.join(str(p) for p in written)}", file=sys.stderr)
