"""Write a short synthetic video (a square moving over a colour gradient) for tests and demos."""
from __future__ import annotations

import argparse

from sfedge.runtime.video import make_demo_video


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="output file, e.g. clip.mp4")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--fps", type=int, default=12)
    parser.add_argument("--size", type=int, default=160, help="width = height in pixels")


def run(args: argparse.Namespace) -> int:
    print(make_demo_video(args.path, args.seconds, args.fps, args.size))
    return 0
