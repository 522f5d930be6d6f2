"""Compare an artifact folder with the eager model rebuilt from its manifest's weights source:
per component (max abs, cosine) and end to end over teacher-forced steps: the gate (top-1 and KL
against the simulated recipe where the backend has one, else against fp32) and agreement with fp32
(KL divergence, top-1). Exits 1 when the recipe's tolerance is not met or any output is NaN/Inf."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", metavar="DIR", help="artifact folder written by `sfedge export`")
    parser.add_argument("--steps", type=int, default=32, help="teacher-forced decode steps (1 to 4096; capped by the context)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test inputs (>= 0)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifacts")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from sfedge.runtime.parity import check_arguments, run_parity
    from sfedge.runtime.sessions import SessionOptions

    check_arguments(args.steps, args.seed)  # before opening anything
    report = run_parity(args.artifacts, SessionOptions(verify=not args.no_verify), args.steps, args.seed)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.passed else 1
