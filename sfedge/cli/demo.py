"""The embedded default: the tiny preset with random weights on a video the tool writes itself,
run end to end (decode, sample, encode, project, splice, prefill, decode) with the timing summary.
The weights are random, so the text is gibberish; the pipeline and the timings are real."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="preset (default: tiny)")
    parser.add_argument("--artifacts", metavar="DIR", help="run this artifact folder instead of the eager model")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--prompt", default="What happens in the video?")


def run(args: argparse.Namespace) -> int:
    from sfedge.budget import compute_budget, format_budget, template_text_tokens
    from sfedge.config import get_preset
    from sfedge.runtime.pipeline import Pipeline
    from sfedge.runtime.sampling import SamplingConfig
    from sfedge.runtime.video import make_demo_video

    config = get_preset(args.model)
    with tempfile.TemporaryDirectory(prefix="sfedge-demo-") as tmp:
        video = make_demo_video(Path(tmp) / "demo.mp4")
        print(f"video: {video} (2 s synthetic clip, 12 fps)", file=sys.stderr)
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
        print(f"[{pipeline.session.backend}] {pipeline.last_stats.summary()}", file=sys.stderr)
    return 0
