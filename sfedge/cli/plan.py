"""Plan a frame budget before running anything: from device profiles (`sfedge bench DIR --profile-out
FILE`), list the frame counts and SlowFast specs (and backends/recipes, one per profile) whose
predicted TTFT and peak RSS fit the limits, ranked by visual tokens, and plot predicted TTFT vs frames
with the profiles' measured points. No model is loaded.

    sfedge plan --profile et_8da4w.json --profile onnx_int4.json --max-ttft 10s --max-rss 3GiB
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--profile", action="append", required=True, metavar="FILE",
                        help="device profile (repeat for several backends/recipes)")
    parser.add_argument("--max-ttft", default="10s", help="time to first token limit, e.g. 10s, 800ms (default: 10s)")
    parser.add_argument("--max-rss", default="3GiB", help="peak RSS limit, e.g. 3GiB, 800MiB (default: 3GiB)")
    parser.add_argument("--model", metavar="PRESET", help="refuse profiles measured on another preset")
    parser.add_argument("--frames", metavar="N[,N]", help="frame counts to consider (default: 1,2,4,8,...,128)")
    parser.add_argument("--slowfast", metavar="SPEC[,SPEC]", help="SlowFast specs to consider (default: the profile's + the paper's)")
    parser.add_argument("--gen-tokens", type=int, default=32, help="answer tokens to reserve (default: 32)")
    parser.add_argument("--all", action="store_true", help="also list the candidates that do not fit, with the reason")
    parser.add_argument("--plot", default="plan_ttft.png", metavar="PNG", help="where to write the plot (default: plan_ttft.png)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot (and the matplotlib import)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from sfedge.benchmarks.cases import parse_int_list, parse_str_list
    from sfedge.benchmarks.costmodel import check_applies_to_preset, load_profile
    from sfedge.benchmarks.plan import FRAME_CANDIDATES, candidates, format_plan, parse_bytes, parse_duration_ms, write_plot
    from sfedge.errors import UsageError

    max_ttft = parse_duration_ms(args.max_ttft, "--max-ttft")
    max_rss = parse_bytes(args.max_rss, "--max-rss")
    if args.gen_tokens < 1:
        raise UsageError(f"--gen-tokens must be >= 1, got {args.gen_tokens}")
    profiles = [(path, load_profile(path)) for path in args.profile]
    if args.model:
        for path, profile in profiles:
            check_applies_to_preset(profile, args.model, path)
    frames = FRAME_CANDIDATES if args.frames is None else parse_int_list(args.frames, "--frames")
    specs = [s for s in parse_str_list(args.slowfast) if s] or None
    ranked = candidates(profiles, max_ttft, max_rss, frames, specs, args.gen_tokens)
    if args.json:
        print(json.dumps([{"profile": c.profile_path, "fits": c.fits, "reason": c.reason, **c.prediction.to_dict()}
                          for c in ranked if c.fits or args.all], indent=1))
    else:
        print(format_plan(ranked, max_ttft, max_rss, args.all))
    sys.stdout.flush()
    if not args.no_plot:
        written = write_plot(Path(args.plot), profiles, max_ttft, frames)
        print(f"plot: {written}", file=sys.stderr)
    return 0
