"""List the model presets with their shapes and parameter counts."""
from __future__ import annotations

import argparse
import json

from sfedge.config import PRESETS
from sfedge.params import count_parameters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    rows = []
    for name, config in PRESETS.items():
        counts = count_parameters(config)
        rows.append({"preset": name, "llm": f"{config.llm.hidden}x{config.llm.layers}", "vision": f"{config.vision.width}x{config.vision.depth}",
                     "frame_size": config.vision.frame_size, "frames": config.slowfast.frames, "slowfast": config.slowfast.spec, **counts})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':<17} {'vision':>9} {'llm':>9} {'vision params':>14} {'projector':>10} {'llm params':>12} {'total':>12}  slowfast")
    for r in rows:
        print(f"{r['preset']:<17} {r['vision']:>9} {r['llm']:>9} {r['vision_encoder']:>14,} {r['projector']:>10,} "
              f"{r['llm_total']:>12,} {r['total']:>12,}  {r['slowfast']} @ {r['frames']} frames")
    return 0
