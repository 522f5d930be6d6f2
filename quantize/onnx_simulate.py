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
A component with a decode graph (recipe int8-channel-q4decode: int8-channel prefill, int4 block 128 decode)
gets both roundings and picks one per call by its token count, as the runtime picks the graph.
It is a model of the kernels, not a bit-exact copy: parity's EXACT_EXPORT tolerance (KL bound)
absorbs the difference, which quantize/recipes.py records as measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

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


@dataclass(frozen=True)
class Rounded:
    """One layer under a scheme: its rounded weight and the forward pre-hooks that round its input, in order."""

    weight: torch.Tensor
    hooks: Tuple[Callable, ...] = ()


@torch.no_grad()
def rounding(module: nn.Module, scheme) -> Dict[nn.Module, Rounded]:
    """What ``scheme`` does to each nn.Linear / nn.Embedding of ``module`` (nothing is changed here)."""
    name = scheme.scheme
    plan: Dict[nn.Module, Rounded] = {}
    if name == "fp32":
        return plan
    options = scheme.options
    ops = tuple(options.get("ops", ("MatMul",)))
    if name in ("fp16", "q4f16"):
        for layer in _targets(module, ("MatMul", "Gather")):
            plan[layer] = Rounded(layer.weight.half().float(), (_activation_fp16,) if isinstance(layer, nn.Linear) else ())
    if name in ("int4", "q4f16"):
        block = int(scheme.group_size or 32)
        for layer in _targets(module, ops):
            before = plan.get(layer, Rounded(layer.weight))
            hooks = before.hooks
            if isinstance(layer, nn.Linear) and options.get("accuracy_level") == 4 and name == "int4":
                hooks += (_activation_int8_blocks(block),)
            plan[layer] = Rounded(_int4_blocks(before.weight, block), hooks)
    if name in ("int8", "int8-channel"):
        weights = _int8_tensor if name == "int8" else _int8_channel
        for layer in _targets(module, ops):
            plan[layer] = Rounded(weights(layer.weight),
                                  (_activation_uint8_tensor,) if isinstance(layer, nn.Linear) else ())
    return plan


def simulate_component(module: nn.Module, scheme) -> None:
    for layer, rounded in rounding(module, scheme).items():
        _replace_weight(layer, rounded.weight)
        for hook in rounded.hooks:
            layer.register_forward_pre_hook(hook)


def simulate_two_graphs(module: nn.Module, prefill, decode) -> None:
    """A component exported as two graphs over one KV cache: calls of T > 1 tokens (``module``'s first argument
    [1, T, ...]) run ``prefill``'s rounding, calls of one token ``decode``'s, as the ONNX session routes them."""
    plans = {False: rounding(module, prefill), True: rounding(module, decode)}
    state = {"decode": False}

    def route(_module, args):
        state["decode"] = args[0].shape[1] == 1

    module.register_forward_pre_hook(route)
    for layer in {*plans[False], *plans[True]}:
        variants = {step: plan.get(layer, Rounded(layer.weight)) for step, plan in plans.items()}
        weights = {step: nn.Parameter(v.weight, requires_grad=False) for step, v in variants.items()}

        def choose(layer, args, variants=variants, weights=weights):
            step = state["decode"]
            layer.weight = weights[step]
            for hook in variants[step].hooks:
                args = hook(layer, args)
            return args

        layer.register_forward_pre_hook(choose)


def simulate_recipe(model: nn.Module, recipe) -> None:
    """Round an eager SFLlava in place as the ONNX recipe's tools round the exported graphs (a component with a
    decode graph: its prefill scheme for T > 1 calls, its decode scheme for T = 1)."""
    for component in Component:
        module, decode = getattr(model, component.value), recipe.decode_scheme(component)
        if decode is None:
            simulate_component(module, recipe.scheme(component))
        else:
            simulate_two_graphs(module, recipe.scheme(component), decode)
