"""Answer a question about a video and stream the text, then print a one-line timing summary.

    sfedge run --model tiny --video clip.mp4 --prompt "What happens?"      (eager PyTorch model)
    sfedge run out/tiny_executorch_8da4w --video clip.mp4 --prompt "..."   (an exported artifact folder)
"""
from __future__ import annotations

import argparse
import json
import sys

from sfedge.cli.common import (add_generation_arguments, add_model_arguments, add_weights_arguments, model_config,
                               sampling_config, weights_source)
from sfedge.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", nargs="?", metavar="DIR", help="artifact folder written by `sfedge export`")
    parser.add_argument("--video", required=True, help="video file (mp4, mkv, avi, webm, mov) or image (jpg, png)")
    parser.add_argument("--prompt", required=True, help="the question about the video")
    parser.add_argument("--backend", help="with DIR: run another backend on it, e.g. eager (the reference model)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifacts")
    parser.add_argument("--threads", type=int, help="CPU threads for the backend")
    parser.add_argument("--max-context", type=int, help="eager model only: KV-cache length (default: prompt + new tokens)")
    parser.add_argument("--stats-json", metavar="FILE", help="also write the run's statistics as JSON")
    add_model_arguments(parser, model_required=False)
    add_weights_arguments(parser)
    add_generation_arguments(parser)


def build_pipeline(args: argparse.Namespace):
    from sfedge.runtime.pipeline import Pipeline
    from sfedge.runtime.sessions import SessionOptions

    if args.artifacts:
        if args.model or args.llm or args.vision or args.projector:
            raise UsageError("pass either an artifact folder or --model/--llm/--vision/--projector, not both")
        options = SessionOptions(verify=not args.no_verify, threads=args.threads)
        return Pipeline.from_folder(args.artifacts, options, args.backend)
    if not args.model:
        raise UsageError("pass an artifact folder (DIR) or --model PRESET")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = model_config(args)
    max_context = args.max_context
    if max_context is None:
        from sfedge.budget import compute_budget, template_text_tokens

        budget = compute_budget(config, template_text_tokens(config, args.prompt, args.llm), max_new_tokens=args.max_new_tokens)
        max_context = min(budget.total_tokens + 16, config.llm.max_context)
    return Pipeline.from_preset(config, weights_source(args), max_context)


def run(args: argparse.Namespace) -> int:
    from sfedge.runtime.pipeline import VideoOptions

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    pipeline = build_pipeline(args)
    video = VideoOptions(policy=args.sampling, sample_fps=args.sample_fps, max_frames=args.frames)
    for piece in pipeline.stream(args.video, args.prompt, args.max_new_tokens, sampling_config(args), video):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = pipeline.last_stats
    print(f"[{pipeline.session.backend}] {stats.summary()}", file=sys.stderr)
    if args.stats_json:
        with open(args.stats_json, "w") as handle:
            json.dump(stats.to_dict(), handle, indent=2)
    return 0
