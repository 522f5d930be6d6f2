"""Argument groups shared by several subcommands; defaults come from the dataclasses only."""
from __future__ import annotations

import argparse
import math

from sfedge.config import PRESETS, ModelConfig, get_preset
from sfedge.errors import UsageError
from sfedge.models import WeightsSource
from sfedge.runtime.sampling import SamplingConfig
from sfedge.runtime.video import SAMPLING

_WEIGHTS = WeightsSource()
_SAMPLING = SamplingConfig()


# --- validated values: argparse types shared by every subcommand (a bad value is a one-line usage error) ---

def _number(text: str, kind, what: str, accept) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "an integer >= 1", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def probability(text: str) -> float:
    return _number(text, float, "a probability in (0, 1]", lambda v: math.isfinite(v) and 0 < v <= 1)


def prompt_text(text: str) -> str:
    """A question: non-empty UTF-8 (argv bytes that are not UTF-8 arrive as surrogates)."""
    from sfedge.prompt import check_question

    try:
        return check_question(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def frame_list(text: str) -> list:
    """``--frames 8,32,128`` for export: the first count is the default, each gets its own projector."""
    from sfedge.benchmarks.cases import parse_int_list

    try:
        return parse_int_list(text, "--frames")
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model_arguments(parser: argparse.ArgumentParser, model_required: bool = True, frame_list_allowed: bool = False) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=model_required, metavar="PRESET",
                       help=f"model preset: {', '.join(PRESETS)}")
    if frame_list_allowed:
        group.add_argument("--frames", type=frame_list, metavar="N[,N...]",
                           help="frames per video (default: the preset's); several counts, e.g. 8,32,128, export one "
                                "projector per count into the same folder (the first is the default)")
    else:
        group.add_argument("--frames", type=positive_int, help="frames sampled per video (default: the preset's)")
    group.add_argument("--slowfast", metavar="SPEC",
                       help="SF-LLaVA spec, e.g. slowfast-slow_10frms_spatial_1d_max_pool-fast_4x4")
    group.add_argument("--no-slow-repeat", dest="slow_repeat", action="store_false",
                       help="with fewer frames than the spec's N slow frames, keep each frame once (min(N, T) slow "
                            "frames, fewer tokens) instead of the v1 code's N slow frames with repeats")


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("weights (components without a checkpoint get seeded random weights)")
    group.add_argument("--weights", choices=["random"], default="random",
                       help="random: seeded random weights of the true shapes (latency and memory are real)")
    group.add_argument("--seed", type=non_negative_int, default=_WEIGHTS.seed, help="seed of the random weights")
    group.add_argument("--llm", metavar="DIR", help="Hugging Face Qwen2.5 folder (config.json + safetensors)")
    group.add_argument("--vision", metavar="PATH", help="Oryx-ViT / SigLIP safetensors file or folder")
    group.add_argument("--projector", metavar="FILE", help="projector (mm_projector) safetensors file")


def model_config(args: argparse.Namespace) -> ModelConfig:
    config = get_preset(args.model)
    if args.frames is not None and args.frames < 1:
        raise UsageError(f"--frames must be >= 1, got {args.frames}")
    return config.with_slowfast(args.frames, args.slowfast, None if args.slow_repeat else False)


def weights_source(args: argparse.Namespace) -> WeightsSource:
    return WeightsSource(seed=args.seed, llm_dir=args.llm, vision_path=args.vision, projector_path=args.projector)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=positive_int, default=64)
    group.add_argument("--temperature", type=non_negative_float, default=_SAMPLING.temperature, help="0 = greedy (default)")
    group.add_argument("--top-p", type=probability, default=_SAMPLING.top_p)
    group.add_argument("--sample-seed", type=non_negative_int, default=None, help="seed of the sampler (with --temperature > 0)")
    group = parser.add_argument_group("video")
    group.add_argument("--sampling", choices=SAMPLING.names(), default="uniform",
                       help="frame sampling: uniform (SF-LLaVA v1) or fps (the paper's rule, uniform past the cap)")
    group.add_argument("--sample-fps", type=positive_float, default=1.0, help="frames per second for --sampling fps")


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(args.temperature, args.top_p, args.sample_seed).validate()
