"""Per-operator time of every component of an artifact folder (ExecuTorch via ETDump, ONNX Runtime via its profiler).

    sfedge profile out/tiny_executorch_8da4w
    sfedge profile out/sf1b_et --positions 100,1500,5800 --top 15 --json profile.json

Cases: the vision encoder on one batch, the default projector, the text decoder on one prefill chunk and one
decode step at each position (clipped to the export's max context). Per case: the top operators with calls,
total ms, share of the call, and where they ran (ExecuTorch: inside the XNNPACK delegate or a portable kernel;
ONNX Runtime: the execution provider). See docs/profiles/.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("folder", metavar="DIR", help="an artifact folder written by `sfedge export`")
    parser.add_argument("--positions", default="100,1500,5800", metavar="N[,N]",
                        help="cache positions of the profiled decode steps (default: 100,1500,5800)")
    parser.add_argument("--runs", type=int, default=2, help="calls per case in one session; the last is reported (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (ONNX Runtime) / threadpool size (ExecuTorch); default: the runtime's own")
    parser.add_argument("--top", type=int, default=12, help="operators per case in the table (default 12)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every case's full op list as JSON")


def run(args: argparse.Namespace) -> int:
    from sfedge.benchmarks.cases import parse_int_list
    from sfedge.benchmarks.op_profile import profile_folder, table, to_json
    from sfedge.errors import UsageError

    if not Path(args.folder).is_dir():
        raise UsageError(f"{args.folder}: not a folder (give an artifact folder written by `sfedge export`)")
    if args.runs < 1 or args.top < 1:
        raise UsageError(f"--runs and --top must be >= 1, got {args.runs} and {args.top}")
    positions = parse_int_list(args.positions, "--positions", minimum=0)
    profiles = profile_folder(Path(args.folder), positions, args.runs, args.threads)
    print(table(profiles, args.top))
    if args.json:
        args.json.write_text(to_json(profiles) + "\n")
        print(f"\nwrote {args.json}")
    return 0
