"""Export the vision encoder, projector, token embedding and LLM as separate artifacts plus one
manifest, into <out>/ (written to a temporary folder and renamed at the end)."""
from __future__ import annotations

import argparse
import signal
import sys
import time

from sfedge.backends import exportable
from sfedge.cli.common import add_model_arguments, add_weights_arguments, model_config, positive_int, weights_source
from sfedge.errors import UsageError

_BACKENDS = exportable()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sfedge.export.api import ExportOptions

    defaults = ExportOptions(backend="executorch")
    add_model_arguments(parser, frame_list_allowed=True)
    add_weights_arguments(parser)
    group = parser.add_argument_group("export")
    group.add_argument("--backend", required=True, choices=_BACKENDS)
    group.add_argument("--quant", default=defaults.recipe, metavar="RECIPE",
                       help="quantization recipe of the backend (see docs/<backend>.md; fp32 is the baseline)")
    group.add_argument("--max-context", type=positive_int, help="KV-cache length (default: the token budget + 512, rounded up)")
    group.add_argument("--prefill-chunk", type=positive_int, default=defaults.prefill_chunk, help="largest prefill chunk")
    group.add_argument("--encoder-batch", type=positive_int, default=defaults.encoder_batch, help="frames per vision-encoder call")
    group.add_argument("--coreml-target", default=defaults.coreml_target, metavar="TARGET",
                       help="coreml: minimum deployment target of the vision encoder and projector (the stateful LLM needs iOS18)")
    group.add_argument("--kv-layout", default=defaults.kv_layout, choices=["gqa-inplace", "past-present", "prefix-inplace"],
                       help="onnx: decoder KV cache, GroupQueryAttention on one in-place buffer per layer (default), "
                            "transformers.js's past/present tensors (for the web) or a position-major in-place buffer "
                            "with standard-op attention (prefix-inplace: decode nearly flat with context)")
    group.add_argument("--calibration-video", metavar="VIDEO",
                       help="onnx: frames to calibrate a static int8 vision encoder on (default: synthetic frames)")
    group.add_argument("--out", required=True, help="output folder")
    group.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    group.add_argument("--quiet", action="store_true", help="no progress lines")
    group.add_argument("--serial", action="store_true",
                       help="executorch: export the vision encoder and projectors in this process too (default: a "
                            "second process lowers them beside the LLM when two cores and the memory allow)")
    group.add_argument("--ignore-memory-check", action="store_true",
                       help="export even when the estimated peak memory exceeds what is available "
                            "(the check reads MemAvailable, a cgroup limit, or SFEDGE_MEMORY_LIMIT=12GiB)")


def run(args: argparse.Namespace) -> int:
    from sfedge.export.api import ExportOptions, export_model
    from sfedge.export.common import Terminated, stage_table
    from sfedge.manifest import decode_graph

    frame_counts = args.frames or []
    args.frames = frame_counts[0] if frame_counts else None  # the first count is the folder's default
    options = ExportOptions(backend=args.backend, recipe=args.quant, max_context=args.max_context,
                            prefill_chunk=args.prefill_chunk, encoder_batch=args.encoder_batch,
                            overwrite=args.overwrite, show_progress=not args.quiet, coreml_target=args.coreml_target,
                            extra_frames=tuple(frame_counts[1:]), kv_layout=args.kv_layout,
                            calibration_video=args.calibration_video, memory_check=not args.ignore_memory_check,
                            parallel_parts=not args.serial)
    config = model_config(args)
    if args.max_context is not None:
        from sfedge.models import resolve_config

        context = resolve_config(config, weights_source(args)).llm.max_context
        if args.max_context > context:
            raise UsageError(f"--max-context {args.max_context:,} exceeds model {config.name}'s context of {context:,} tokens")
    started = time.perf_counter()
    try:
        manifest = export_model(config, weights_source(args), options, args.out)
    except Terminated:
        print("sfedge export: terminated (SIGTERM); the partial output was removed", file=sys.stderr)
        return 128 + signal.SIGTERM
    for entry in manifest.components:
        print(f"{entry.component:<16} {entry.file:<32} {entry.bytes / 2**20:>9.2f} MiB  {entry.quantization}")
        step = decode_graph(entry)  # a second decoder graph for decode steps (int8-channel-q4decode)
        if step is not None:
            print(f"{'  decode steps':<16} {step.file:<32} {step.bytes / 2**20:>9.2f} MiB  {step.quantization}")
    if not args.quiet:
        print(stage_table(manifest.stages, manifest.export_peak_rss_bytes), file=sys.stderr)
        print(f"wall time {time.perf_counter() - started:.1f} s (stages in a second process overlap: their sum is more)",
              file=sys.stderr)
    print(f"wrote {args.out} ({manifest.backend}, recipe {manifest.recipe})", file=sys.stderr)
    return 0
