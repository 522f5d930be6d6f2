"""What the toolkit is for, on the tiny preset (random weights, offline, about a minute or two on 2
cores): answer a question about a video the tool writes itself with the eager model, export it to
ExecuTorch and ONNX, check each export's parity against eager PyTorch, benchmark both against eager
(one fresh process per case) and print the per-stage table and where the plot went.
The weights are random, so the text is gibberish; the pipeline, the parity and the timings are real.

    sfedge demo                         (exports into a temp folder, removed at the end)
    sfedge demo --out demo/             (keep the exports, the plots and bench.json)
    sfedge demo --eager-only            (just the eager answer, a few seconds)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_EXPORTS = "executorch:fp32,onnx:fp32"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default="tiny", help="preset (default: tiny)")
    parser.add_argument("--artifacts", metavar="DIR", help="answer with this artifact folder instead of the eager model "
                                                           "(implies --eager-only)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--prompt", default="What happens in the video?")
    parser.add_argument("--exports", default=DEFAULT_EXPORTS, metavar="BACKEND:RECIPE[,...]",
                        help=f"exports to make, check and benchmark (default: {DEFAULT_EXPORTS})")
    parser.add_argument("--out", metavar="DIR", help="keep the exports, plots and bench.json here (default: a temp folder)")
    parser.add_argument("--eager-only", action="store_true", help="only answer with the eager model (no export/parity/bench)")
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="benchmark repetitions per case (default: 3)")


def _exports(text: str) -> list:
    from sfedge.backends import exportable
    from sfedge.errors import UsageError

    pairs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        backend, _, recipe = item.partition(":")
        if backend not in exportable():
            raise UsageError(f"--exports: unknown backend {backend!r} in {item!r}; known: {', '.join(exportable())}")
        pairs.append((backend, recipe or "fp32"))
    if not pairs:
        raise UsageError("--exports needs at least one BACKEND:RECIPE, e.g. onnx:fp32")
    return pairs


def _answer(args, config, video: Path) -> str:
    from sfedge.budget import compute_budget, format_budget, template_text_tokens
    from sfedge.runtime.pipeline import Pipeline
    from sfedge.runtime.sampling import SamplingConfig

    text_tokens = template_text_tokens(config, args.prompt)
    budget = compute_budget(config, text_tokens, max_new_tokens=args.max_new_tokens)
    print(format_budget(budget), file=sys.stderr)
    if args.artifacts:
        pipeline = Pipeline.from_folder(args.artifacts)
    else:
        pipeline = Pipeline.from_preset(config, max_context=budget.total_tokens + 16)
    print(f"Q: {args.prompt}\nA (random weights, sampled at temperature 0.8):", file=sys.stderr)
    sampling = SamplingConfig(temperature=0.8, top_p=0.95, seed=0)
    for piece in pipeline.stream(video, args.prompt, args.max_new_tokens, sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    summary = f"[{pipeline.session.backend}] {pipeline.last_stats.summary()}"
    print(summary, file=sys.stderr)
    return summary


def _step(title: str) -> float:
    print(f"\n== {title}", file=sys.stderr, flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    from sfedge.config import get_preset
    from sfedge.errors import UsageError
    from sfedge.runtime.video import make_demo_video

    config = get_preset(args.model)
    exports = _exports(args.exports)
    if args.repetitions < 1:
        raise UsageError(f"--repetitions must be >= 1, got {args.repetitions}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sfedge-demo-") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        video = make_demo_video(root / "demo.mp4")
        print(f"video: {video} (2 s synthetic clip, 12 fps)", file=sys.stderr)
        _answer(args, config, video)
        if args.eager_only or args.artifacts:
            return 0
        code = _export_check_bench(args, config, exports, root, video)
        print(f"\ndemo finished in {time.perf_counter() - start:.0f} s"
              f"{'' if args.out else ' (exports were in a temp folder: pass --out DIR to keep them)'}", file=sys.stderr)
        return code


def _export_check_bench(args, config, exports, root: Path, video: Path) -> int:
    from sfedge.benchmarks.cases import Source, Sweep
    from sfedge.benchmarks.plots import budget_models, write_plots
    from sfedge.benchmarks.printers import render
    from sfedge.benchmarks.runner import run_sweep
    from sfedge.export.api import ExportOptions, export_model
    from sfedge.models import WeightsSource
    from sfedge.runtime.parity import run_parity
    from sfedge.runtime.sessions import SessionOptions

    folders = []
    for backend, recipe in exports:
        folder = root / f"{config.name}_{backend}_{recipe}"
        began = _step(f"export {config.name} -> {backend} ({recipe})")
        export_model(config, WeightsSource(seed=0), ExportOptions(backend=backend, recipe=recipe, max_context=256,
                                                                  prefill_chunk=64, overwrite=True, show_progress=False), folder)
        print(f"{folder} written in {time.perf_counter() - began:.0f} s", file=sys.stderr)
        folders.append(folder)
    failed = []
    for folder in folders:
        _step(f"parity of {folder.name} against eager PyTorch")
        report = run_parity(folder, SessionOptions(), steps=8)
        print(report.table(), file=sys.stderr)
        if not report.passed:
            failed.append(folder.name)
    _step(f"benchmark {', '.join(f.name for f in folders)} and eager ({args.repetitions} repetitions, one process per case)")
    sources = [Source(folder=str(f)) for f in folders] + [Source(preset=config.name)]
    sweep = Sweep(sources=sources, video=str(video), gen_tokens=[16], threads=[1], repetitions=args.repetitions, warmup=1)
    document = run_sweep(sweep, with_limits=False)
    print(render(document, "md"))
    plots = root / "plots"
    written = write_plots(document, plots, budget_models(sources, [None]), [])
    (plots / "bench.json").write_text(render(document, "json"))
    print(f"plots: {', '.join(str(p) for p in written)}", file=sys.stderr)
    if failed:
        print(f"parity FAILED for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or any(r.get("status") != "ok" for r in document["results"]) else 0
