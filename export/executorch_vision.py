"""How the ExecuTorch exporter turns the vision encoder into a program, per vision scheme.

Every scheme traces ``VisionEncoder.use_export_graph()`` (explicit attention and layer norms), so the
whole encoder is one XNNPACK delegate; ``ops_outside_delegate`` checks that on the lowered program.

* ``fp32`` / ``8da8w``: torchao quantizes the linears before ``torch.export`` (dynamic int8 activations).
* ``int8-static``: PT2E with XNNPACK's quantizer (symmetric, per-channel weights, static per-tensor
  activations) on the linears and the patch convolution, calibrated on synthetic frames.
* ``fp16``: the encoder in float16 inside the delegate; the pte still takes and returns float32.
"""
from __future__ import annotations

import collections
from typing import Callable, Counter, Dict

import numpy as np
import torch
from torch import nn

from sfedge.errors import UsageError
from sfedge.models.vision import VisionEncoder
from sfedge.quantize.executorch import quantize_component
from sfedge.quantize.recipes import ComponentScheme
from sfedge.registry import Registry

COMPONENT = "vision_encoder"
CALIBRATION_FRAMES = 8
# Ops a fully delegated program may still hold outside the delegate (tuple plumbing, fp16 casts).
TRIVIAL_OPS = frozenset({"getitem", "executorch_call_delegate", "_to_dim_order_copy.default", "_to_copy.default",
                         "_clone_dim_order.default"})

Tracer = Callable[[VisionEncoder, ComponentScheme, tuple], "torch.export.ExportedProgram"]
VISION_TRACERS: Registry[Tracer] = Registry("ExecuTorch vision-encoder scheme")


def calibration_frames(size: int, count: int, mean: float, std: float, seed: int = 0) -> torch.Tensor:
    """``count`` preprocessed synthetic frames [count, 3, size, size]: colour ramps, a moving square, sensor noise
    (no data set is downloaded; with random weights the activation ranges depend on the network more than the pixels)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    frames = np.empty((count, size, size, 3), np.float32)
    for i in range(count):
        frames[i, ..., 0] = ramp[None, :]
        frames[i, ..., 1] = ramp[:, None]
        frames[i, ..., 2] = i / max(count - 1, 1)
        side, x = size // 4, int((size - size // 4) * i / max(count - 1, 1))
        frames[i, size // 3: size // 3 + side, x: x + side] = (0.0, 0.0, 1.0)
    frames = np.clip(frames + rng.normal(0.0, 0.05, frames.shape).astype(np.float32), 0.0, 1.0)
    return (torch.from_numpy(frames).permute(0, 3, 1, 2) - mean).div(std).contiguous()


def _export(module: nn.Module, example: tuple) -> "torch.export.ExportedProgram":
    with torch.no_grad():
        return torch.export.export(module, example, strict=False)


def _trace_torchao(encoder: VisionEncoder, scheme: ComponentScheme, example: tuple):
    quantize_component(encoder, COMPONENT, scheme)
    return _export(encoder, example)


def _trace_static_int8(encoder: VisionEncoder, scheme: ComponentScheme, example: tuple):
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer, get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ModuleNotFoundError as exc:
        raise UsageError(f"static int8 needs {exc.name}: pip install 'sfedge[executorch]'") from None
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    # Linears and the patch convolution only: the layer norms' mul/add/mean stay fp32 (int8 there costs accuracy).
    quantizer = XNNPACKQuantizer().set_module_type(nn.Linear, config).set_module_type(nn.Conv2d, config)
    vision = encoder.config
    frames = calibration_frames(vision.frame_size, int(scheme.options.get("calibration_frames", CALIBRATION_FRAMES)),
                                vision.pixel_mean, vision.pixel_std)
    batch = example[0].shape[0]
    with torch.no_grad():
        prepared = prepare_pt2e(torch.export.export(encoder, example, strict=False).module(), quantizer)
        for start in range(0, len(frames) - batch + 1, batch):
            prepared(frames[start:start + batch])
        converted = convert_pt2e(prepared)
    return _export(converted, example)


class _Float16(nn.Module):
    """float32 pixels in, float32 features out; the encoder in between runs in float16."""

    def __init__(self, encoder: VisionEncoder):
        super().__init__()
        self.encoder = encoder.half()
        for block in self.encoder.blocks:
            block.mlp.gelu_dtype = torch.float32

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels.to(torch.float16)).to(torch.float32)


def _trace_fp16(encoder: VisionEncoder, scheme: ComponentScheme, example: tuple):
    return _export(_Float16(encoder), example)


VISION_TRACERS.add("fp32", _trace_torchao)
VISION_TRACERS.add("8da8w", _trace_torchao)
VISION_TRACERS.add("int8-static", _trace_static_int8)
VISION_TRACERS.add("fp16", _trace_fp16)


def trace_vision_encoder(encoder: VisionEncoder, scheme: ComponentScheme, batch: int) -> "torch.export.ExportedProgram":
    """The encoder's export graph for ``scheme`` at a static batch (quantizes ``encoder`` in place)."""
    tracer = VISION_TRACERS.get(scheme.scheme)
    encoder.eval().use_export_graph()
    size = encoder.config.frame_size
    return tracer(encoder, scheme, (torch.zeros(batch, 3, size, size),))


def _op_name(target) -> str:
    name = getattr(target, "__name__", str(target))
    return name.split("::")[-1].split("aten.")[-1].split("dim_order_ops.")[-1]


def ops_outside_delegate(program: "torch.export.ExportedProgram") -> Counter[str]:
    """op name -> count of the call_function nodes of a lowered edge program left to ExecuTorch's portable kernels."""
    counts: Counter[str] = collections.Counter()
    for node in program.graph.nodes:
        if node.op == "call_function":
            counts[_op_name(node.target)] += 1
    return counts


def nontrivial_ops_outside(program: "torch.export.ExportedProgram") -> Dict[str, int]:
    return {op: n for op, n in ops_outside_delegate(program).items() if op not in TRIVIAL_OPS}
