"""Answer a question about a video and stream the text, then print a one-line timing summary.

    sfedge run --model tiny --video clip.mp4 --prompt "What happens?"      (eager PyTorch model)
    sfedge run out/tiny_executorch_8da4w --video clip.mp4 --prompt "..."   (an exported artifact folder)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from sfedge.cli.common import (add_generation_arguments, add_model_arguments, add_weights_arguments, model_config,
                               positive_int, prompt_text, sampling_config, weights_source)
from sfedge.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", nargs="?", metavar="DIR", help="artifact folder written by `sfedge export`")
    parser.add_argument("--video", required=True, help="video file (mp4, mkv, avi, webm, mov) or image (jpg, png)")
    parser.add_argument("--prompt", required=True, type=prompt_text, help="the question about the video")
    parser.add_argument("--backend", help="with DIR: run another backend on it, e.g. eager (the reference model)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifacts")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for the backend")
    parser.add_argument("--max-context", type=positive_int, help="eager model only: KV-cache length (default: prompt + new tokens)")
    parser.add_argument("--stats-json", metavar="FILE", help="also write the run's statistics as JSON")
    add_model_arguments(parser, model_required=False)
    add_weights_arguments(parser)
    add_generation_arguments(parser)


def build_pipeline(args: argparse.Namespace):
    """The pipeline, after every check that needs no video: the prompt must fit the context."""
    from sfedge.budget import check_prompt_fits, compute_budget, template_text_tokens
    from sfedge.models import resolve_config
    from sfedge.runtime.pipeline import Pipeline
    from sfedge.runtime.sessions import SessionOptions
    from sfedge.runtime.video import check_video_file

    if args.artifacts:
        if args.model or args.llm or args.vision or args.projector or args.slowfast or not args.slow_repeat:
            raise UsageError("pass either an artifact folder or --model/--slowfast/--no-slow-repeat/--llm/--vision/"
                             "--projector, not both")
        if args.max_context is not None:
            raise UsageError("--max-context applies to the eager model (--model); an export's context is fixed at export")
        from sfedge.prompt import tokenize_prompt
        from sfedge.runtime.pipeline import VideoOptions

        check_video_file(args.video)
        options = SessionOptions(verify=not args.no_verify, threads=args.threads)
        pipeline = Pipeline.from_folder(args.artifacts, options, args.backend)
        frames = pipeline.frames_to_sample(VideoOptions(max_frames=args.frames))
        pipeline.load_for_video(VideoOptions(max_frames=frames))
        text_tokens = tokenize_prompt(pipeline.tokenizer, args.prompt, pipeline.config.prompt_template).text_tokens
        check_prompt_fits(pipeline.config, frames, pipeline.session.max_context, text_tokens=text_tokens)
        return pipeline
    if not args.model:
        raise UsageError("pass an artifact folder (DIR) or --model PRESET")
    if args.backend or args.no_verify:
        raise UsageError("--backend and --no-verify apply to an artifact folder (DIR), not to --model")
    weights = weights_source(args)
    config = resolve_config(model_config(args), weights)
    text_tokens = template_text_tokens(config, args.prompt, args.llm)
    max_context = args.max_context
    if max_context is None:
        budget = compute_budget(config, text_tokens, max_new_tokens=args.max_new_tokens)
        max_context = min(budget.total_tokens + 16, config.llm.max_context)
    elif max_context > config.llm.max_context:
        raise UsageError(f"--max-context {max_context:,} exceeds model {config.name}'s context of "
                         f"{config.llm.max_context:,} tokens")
    check_prompt_fits(config, args.frames or config.slowfast.frames, max_context, text_tokens=text_tokens)
    check_video_file(args.video)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return Pipeline.from_preset(config, weights, max_context)


def _check_output_path(path: str | None) -> None:
    """--stats-json is written after the run: refuse an unwritable path before it."""
    if not path:
        return
    from pathlib import Path

    target = Path(path)
    if target.is_dir():
        raise UsageError(f"--stats-json {path} is a folder; pass a file path")
    if not target.parent.is_dir():
        raise UsageError(f"--stats-json {path}: folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"--stats-json {path} is not writable")


def run(args: argparse.Namespace) -> int:
    from sfedge.runtime.pipeline import VideoOptions

    _check_output_path(args.stats_json)
    sampling = sampling_config(args)
    pipeline = build_pipeline(args)
    video = VideoOptions(policy=args.sampling, sample_fps=args.sample_fps, max_frames=args.frames)
    for piece in pipeline.stream(args.video, args.prompt, args.max_new_tokens, sampling, video):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = pipeline.last_stats
    print(f"[{pipeline.session.backend}] {stats.summary()}", file=sys.stderr)
    if args.stats_json:
        with open(args.stats_json, "w") as handle:
            json.dump(stats.to_dict(), handle, indent=2)
    return 0
