"""Export the vision encoder, projector, token embedding and LLM as separate artifacts plus one
manifest, into <out>/ (written to a temporary folder and renamed at the end)."""
from __future__ import annotations

import argparse
import sys

from sfedge.cli.common import add_model_arguments, add_weights_arguments, model_config, weights_source
from sfedge.manifest import Backend

_BACKENDS = [b.value for b in Backend if b is not Backend.EAGER]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sfedge.export.api import ExportOptions

    defaults = ExportOptions(backend="executorch")
    add_model_arguments(parser, frame_list_allowed=True)
    add_weights_arguments(parser)
    group = parser.add_argument_group("export")
    group.add_argument("--backend", required=True, choices=_BACKENDS)
    group.add_argument("--quant", default=defaults.recipe, metavar="RECIPE",
                       help="quantization recipe of the backend (see docs/<backend>.md; fp32 is the baseline)")
    group.add_argument("--max-context", type=int, help="KV-cache length (default: the token budget + 512, rounded up)")
    group.add_argument("--prefill-chunk", type=int, default=defaults.prefill_chunk, help="largest prefill chunk")
    group.add_argument("--encoder-batch", type=int, default=defaults.encoder_batch, help="frames per vision-encoder call")
    group.add_argument("--coreml-target", default=defaults.coreml_target, metavar="TARGET",
                       help="coreml: minimum deployment target of the vision encoder and projector (the stateful LLM needs iOS18)")
    group.add_argument("--kv-layout", default=defaults.kv_layout, choices=["gqa-inplace", "past-present"],
                       help="onnx: decoder KV cache, GroupQueryAttention on one in-place buffer per layer (default) or "
                            "transformers.js's past/present tensors (for the web)")
    group.add_argument("--calibration-video", metavar="VIDEO",
                       help="onnx: frames to calibrate a static int8 vision encoder on (default: synthetic frames)")
    group.add_argument("--out", required=True, help="output folder")
    group.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    group.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from sfedge.export.api import ExportOptions, export_model

    frame_counts = args.frames or []
    args.frames = frame_counts[0] if frame_counts else None  # the first count is the folder's default
    options = ExportOptions(backend=args.backend, recipe=args.quant, max_context=args.max_context,
                            prefill_chunk=args.prefill_chunk, encoder_batch=args.encoder_batch,
                            overwrite=args.overwrite, show_progress=not args.quiet, coreml_target=args.coreml_target,
                            extra_frames=tuple(frame_counts[1:]), kv_layout=args.kv_layout,
                            calibration_video=args.calibration_video)
    manifest = export_model(model_config(args), weights_source(args), options, args.out)
    for entry in manifest.components:
        print(f"{entry.component:<16} {entry.file:<32} {entry.bytes / 2**20:>9.2f} MiB  {entry.quantization}")
    print(f"wrote {args.out} ({manifest.backend}, recipe {manifest.recipe})", file=sys.stderr)
    return 0
