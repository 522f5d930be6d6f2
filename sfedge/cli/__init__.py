"""The `sfedge` command: one subcommand per file, each a thin layer over the Python API.

Exit codes: 0 ok, 1 failure (an SfedgeError), 2 usage error (argparse or UsageError).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from sfedge import __version__
from sfedge.errors import SfedgeError, UsageError

# subcommand -> (module, one-line help); each module has add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "demo": ("sfedge.cli.demo", "run the tiny model end to end on a video the tool makes itself"),
    "presets": ("sfedge.cli.presets", "list model presets with parameter counts"),
    "budget": ("sfedge.cli.budget", "token budget: frames -> visual tokens -> prompt -> KV-cache bytes"),
    "run": ("sfedge.cli.run", "answer a question about a video (eager model or an artifact folder)"),
    "export": ("sfedge.cli.export", "export the components to ExecuTorch / ONNX / Core ML with a manifest"),
    "parity": ("sfedge.cli.parity", "compare an artifact folder with the eager model"),
    "bench": ("sfedge.cli.bench", "benchmark artifact folders: per-stage latency, memory, sweeps, regression gate"),
    "make-video": ("sfedge.cli.make_video", "write a short synthetic test video"),
    "chat": ("sfedge.cli.chat", "chat about a video: its prefix is encoded once, each question prefills only itself"),
    "plan": ("sfedge.cli.plan", "frame counts / SlowFast specs / recipes that fit a TTFT and memory budget, from device profiles"),
    "profile": ("sfedge.cli.profile", "per-operator times of each component of an artifact folder (ETDump / ORT profiler)"),
}
LIGHT_COMMANDS = ("plan",)  # answered without importing the other subcommands (and torch): see build_parser(only=)


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfedge", description="SlowFast-LLaVA-1.5 video LLMs on phones and laptops.")
    parser.add_argument("--version", action="version", version=f"sfedge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if only and name != only:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # a subcommand not in this build
                continue
            raise
        sub_parser = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(handler=module.run)
    return parser


def _quiet_libraries() -> None:
    """The CLI (never the library) hides the export stack's deprecation chatter."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Mutation on a buffer.*")
    for name in ("torchao", "executorch", "coremltools", "onnxruntime", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_libraries()
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(words[0] if words and words[0] in LIGHT_COMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"sfedge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except SfedgeError as exc:
        print(f"sfedge {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sfedge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
