"""Parity's simulated ONNX recipes: apply an ONNX recipe's rounding to the eager model, in place.

What ONNX Runtime's tools do to a graph (quantize/onnx.py), done to nn.Linear / nn.Embedding:
  int4   MatMulNBitsQuantizer, symmetric: per block of ``group_size`` input values, scale = the
         value of largest magnitude / -8, q = clip(round(w / scale), -8, 7). MatMulNBits with
         accuracy_level 4 also rounds its activations to int8 per block (scale = max |x| / 127).
         GatherBlockQuantized (ops Gather): the same rounding per block of an embedding row.
  int8   quantize_dynamic: per-tensor symmetric int8 weights (scale = max |w| / 127) and, at run
         time, per-tensor asymmetric uint8 activations (DynamicQuantizeLinear).
  int8-channel  DynamicQuantizeMatMul: per-output-channel symmetric int8 weights (scale = max |w| / 127 per
         output), per-tensor asymmetric uint8 activations at run time (as int8).
  fp16   weights and each linear's input rounded to float16 (the graph computes in fp16).
  q4f16  fp16, then int4 as above.
It is a model of the kernels, not a bit-exact copy: parity's EXACT_EXPORT tolerance (KL bound)
absorbs the difference, which quantize/recipes.py records as measured.
"""
from __future__ import annotations

import torch
from torch import nn

from sfedge.manifest import Component


def _int4_blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    """Quantize-dequantize [rows, cols] along cols in blocks, as MatMulNBitsQuantizer (symmetric) does."""
    rows, cols = weight.shape
    padded = -(-cols // block) * block
    values = torch.nn.functional.pad(weight.float(), (0, padded - cols)).reshape(rows, -1, block)
    high, low = values.amax(dim=-1, keepdim=True), values.amin(dim=-1, keepdim=True)
    scale = torch.where(high.abs() > low.abs(), high, low) / -8.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.where(scale == 0, torch.zeros_like(values), (values / safe).round().clamp(-8, 7))
    return (q * scale).reshape(rows, padded)[:, :cols].to(weight.dtype)


def _int8_tensor(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().max().clamp_min(1e-12) / 127.0
    return (weight / scale).round().clamp(-127, 127) * scale


def _int8_channel(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear weight [out, in]: one scale per output row (the ONNX weight's column)."""
    scale = weight.abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale / 127.0, torch.ones_like(scale))
    return (weight / scale).round().clamp(-127, 127) * scale


def _activation_int8_blocks(block: int):
    def hook(_module, args):
        x = args[0]
        cols = x.shape[-1]
        padded = -(-cols // block) * block
        values = torch.nn.functional.pad(x, (0, padded - cols)).reshape(*x.shape[:-1], -1, block)
        scale = values.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
        rounded = ((values / scale).round().clamp(-127, 127) * scale).reshape(*x.shape[:-1], padded)[..., :cols]
        return (rounded,) + tuple(args[1:])
    return hook


def _activation_uint8_tensor(_module, args):
    x = args[0]
    low, high = x.min().clamp_max(0), x.max().clamp_min(0)
    scale = ((high - low) / 255.0).clamp_min(1e-12)
    zero = (-low / scale).round().clamp(0, 255)
    return (((x / scale).round() + zero).clamp(0, 255) - zero) * scale, *args[1:]


def _activation_fp16(_module, args):
    return (args[0].half().float(), *args[1:])


def _targets(module: nn.Module, ops) -> list:
    kinds = tuple(kind for op, kind in (("MatMul", nn.Linear), ("Gather", nn.Embedding)) if op in ops)
    return [child for child in module.modules() if isinstance(child, kinds)]


def _replace_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    layer.weight = nn.Parameter(weight, requires_grad=False)  # a new tensor: unties a shared lm_head/embedding


@torch.no_grad()
def simulate_component(module: nn.Module, scheme) -> None:
    name = scheme.scheme
    if name == "fp32":
        return
    options = scheme.options
    ops = tuple(options.get("ops", ("MatMul",)))
    if name in ("fp16", "q4f16"):
        for layer in _targets(module, ("MatMul", "Gather")):
            _replace_weight(layer, layer.weight.half().float())
            if isinstance(layer, nn.Linear):
                layer.register_forward_pre_hook(_activation_fp16)
    if name in ("int4", "q4f16"):
        block = int(scheme.group_size or 32)
        for layer in _targets(module, ops):
            _replace_weight(layer, _int4_blocks(layer.weight, block))
            if isinstance(layer, nn.Linear) and options.get("accuracy_level") == 4 and name == "int4":
                layer.register_forward_pre_hook(_activation_int8_blocks(block))
    if name in ("int8", "int8-channel"):
        rounding = _int8_tensor if name == "int8" else _int8_channel
        for layer in _targets(module, ops):
            _replace_weight(layer, rounding(layer.weight))
            if isinstance(layer, nn.Linear):
                layer.register_forward_pre_hook(_activation_uint8_tensor)


def simulate_recipe(model: nn.Module, recipe) -> None:
    """Round an eager SFLlava in place as the ONNX recipe's tools round the exported graphs."""
    for component in Component:
        simulate_component(getattr(model, component.value), recipe.scheme(component))
