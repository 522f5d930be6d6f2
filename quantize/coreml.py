"""Core ML compression recipes, as data, plus the one place their deployment-target rules are checked.

Recipes for ``--backend coreml`` (and ``executorch-coreml``) name a scheme per component; the
scheme's settings are those of ``coremltools.optimize.coreml`` (applied to the converted mlprogram,
after ``ct.convert``, so compression is exactly what Core ML stores):

- ``fp16``: fp16 weights and compute (``compute_precision=FLOAT16``), no compression: the baseline.
- ``int8``: ``linear_quantize_weights``, linear_symmetric int8, per output channel.
- ``int4``: ``linear_quantize_weights``, linear_symmetric int4, per block of 32 input channels
  (iOS18 op ``constexpr_blockwise_shift_scale``). A weight whose input width is not a multiple of the
  block falls back to per-channel int4 rather than being skipped silently.
- ``palettize4``: ``palettize_weights``, 4-bit k-means lookup table per group of 16 output channels
  (iOS18 op ``constexpr_lut_to_dense``).

Nothing heavy is imported at module top: the runtime reads these recipes and tolerances cheaply.
``compress`` imports coremltools when called.
"""
from __future__ import annotations

from typing import Dict

from sfedge.errors import UsageError
from sfedge.quantize.recipes import (
    FP16_TOLERANCE, INT4_TOLERANCE, INT8_TOLERANCE, ComponentScheme, Recipe, per_part, register_recipe, uniform,
)

BACKEND = "coreml"
EXECUTORCH_COREML = "executorch-coreml"

# Deployment targets in order; names are those of ``coremltools.target``.
TARGETS = ("iOS16", "iOS17", "iOS18")
STATEFUL_TARGET = "iOS18"  # ct.StateType (the KV cache) and multifunction packages need iOS18 / macOS15

FP16 = ComponentScheme("fp16")
INT8 = ComponentScheme("int8", options={"mode": "linear_symmetric", "dtype": "int8", "granularity": "per_channel"})
INT4 = ComponentScheme("int4", group_size=32,
                       options={"mode": "linear_symmetric", "dtype": "int4", "granularity": "per_block"})
PALETTIZE4 = ComponentScheme("palettize4", group_size=16,
                             options={"mode": "kmeans", "nbits": 4, "granularity": "per_grouped_channel"})

# The minimum deployment target of each (scheme, granularity); checked by ``check_target`` only.
_SCHEME_TARGETS = {("fp16", None): "iOS16", ("int8", "per_channel"): "iOS16", ("int4", "per_block"): "iOS18",
                   ("int4", "per_channel"): "iOS18", ("palettize4", "per_grouped_channel"): "iOS18",
                   ("palettize4", "per_tensor"): "iOS16"}
# What each scheme leaves in the MIL program (the test checks these ops really are there).
SCHEME_OPS = {"fp16": None, "int8": "constexpr_blockwise_shift_scale", "int4": "constexpr_blockwise_shift_scale",
              "palettize4": "constexpr_lut_to_dense"}

def _llm(scheme: ComponentScheme) -> Dict[str, ComponentScheme]:
    return per_part(vision=INT8, decoder=scheme, embedding=scheme)


register_recipe(Recipe("fp16", BACKEND, "fp16 weights and compute everywhere (the Core ML baseline)", uniform(FP16), FP16_TOLERANCE))
register_recipe(Recipe("int8", BACKEND, "int8 per-channel weights everywhere (linear_quantize_weights), fp16 compute",
                       uniform(INT8), INT8_TOLERANCE))
register_recipe(Recipe("int4", BACKEND, "LLM int4 weights per block of 32 (iOS18); vision encoder + projector int8 per channel",
                       _llm(INT4), INT4_TOLERANCE))
register_recipe(Recipe("palettize4", BACKEND, "LLM 4-bit k-means palettization per 16 output channels (iOS18); vision + projector int8",
                       _llm(PALETTIZE4), INT4_TOLERANCE))

# ExecuTorch with every component delegated to Core ML (CoreMLPartitioner); fp16 compute.
register_recipe(Recipe("fp16", EXECUTORCH_COREML, "fp16 Core ML delegate for every component", uniform(FP16), FP16_TOLERANCE))


def target_rank(target: str) -> int:
    if target not in TARGETS:
        raise UsageError(f"unknown Core ML deployment target {target!r}; known: {', '.join(TARGETS)}")
    return TARGETS.index(target)


def scheme_target(scheme: ComponentScheme) -> str:
    key = (scheme.scheme, scheme.options.get("granularity"))
    if key not in _SCHEME_TARGETS:
        known = ", ".join(sorted({s for s, _ in _SCHEME_TARGETS}))
        raise UsageError(f"Core ML scheme {scheme.scheme!r} with granularity {key[1]!r} is not supported; known schemes: {known}")
    return _SCHEME_TARGETS[key]


def check_target(recipe: Recipe, targets: Dict[str, str]) -> None:
    """The one place the cross-field rules live: every component's scheme must be supported by the
    deployment target that component is converted for (e.g. int4 per-block needs iOS18)."""
    for component, target in targets.items():
        scheme = recipe.scheme(component)
        needed = scheme_target(scheme)
        if target_rank(target) < target_rank(needed):
            granularity = scheme.options.get("granularity") or "fp16"
            raise UsageError(f"recipe {recipe.name!r}: {component} uses {scheme.scheme} ({granularity}), which needs Core ML "
                             f"deployment target {needed}, but {component} is converted for {target}: "
                             f"pass --coreml-target {needed} (or choose recipe int8 / fp16)")


# Which constants a scheme compresses: the matrix input of these ops (never RoPE tables or biases).
WEIGHT_PARAMS = {"linear": "weight", "conv": "weight", "gather": "x"}


def compress(mlmodel, scheme: ComponentScheme, op_types: tuple, weight_threshold: int = 2048):
    """Apply ``scheme`` to the weights feeding ``op_types`` (e.g. ("linear", "conv")) of a converted
    single-function mlprogram; returns (model, the manifest's quantization dict)."""
    if scheme.scheme == "fp16":
        return mlmodel, {**scheme.to_dict(), "applied": "fp16 weights (compute_precision FLOAT16)", "compressed_weights": 0}
    try:
        import coremltools.optimize.coreml as cto
    except ModuleNotFoundError as exc:
        raise UsageError(f"Core ML compression needs {exc.name}: pip install 'sfedge[coreml]'") from None
    opts = scheme.options
    weights = _weights_of(mlmodel, op_types, weight_threshold, cto)
    if scheme.scheme in ("int8", "int4"):
        def linear(granularity):
            return cto.OpLinearQuantizerConfig(mode=opts["mode"], dtype=opts["dtype"], granularity=granularity,
                                               block_size=scheme.group_size if granularity == "per_block" else None,
                                               weight_threshold=weight_threshold)

        granularity = opts["granularity"]
        block = scheme.group_size or 32
        # per-block skips a weight whose input width is not a multiple of the block: use per-channel there
        fallback = sorted(n for n, shape in weights.items() if granularity == "per_block" and shape[1] % block)
        configs = {n: linear("per_channel" if n in fallback else granularity) for n in weights}
        model = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=configs))
        return model, {**scheme.to_dict(), "applied": f"linear_quantize_weights {opts['dtype']} {granularity}",
                       "compressed_weights": _count_ops(model, SCHEME_OPS[scheme.scheme]), "per_channel_fallback": fallback}
    if scheme.scheme == "palettize4":
        config = cto.OpPalettizerConfig(mode=opts["mode"], nbits=opts["nbits"], granularity=opts["granularity"],
                                        group_size=scheme.group_size or 16, weight_threshold=weight_threshold)
        model = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs={n: config for n in weights}))
        return model, {**scheme.to_dict(), "applied": f"palettize_weights {opts['nbits']}-bit {opts['mode']} {opts['granularity']}",
                       "compressed_weights": _count_ops(model, SCHEME_OPS[scheme.scheme])}
    raise UsageError(f"Core ML scheme {scheme.scheme!r} is not supported; use one of: {', '.join(SCHEME_OPS)}")


def quantized_before_conversion(mlmodel, scheme: ComponentScheme, per_channel_fallback: list, after: str = "") -> dict:
    """The manifest's quantization dict of a function whose weights quantize/coreml_torch.py quantized in torch
    (same values and ops as ``compress`` would have written; counted in the converted program)."""
    opts = scheme.options
    return {**scheme.to_dict(), "applied": f"linear_quantize_weights {opts['dtype']} {opts['granularity']}, computed on the "
                                            f"torch weights before conversion (torchao dequantize_affine){after}",
            "compressed_weights": _count_ops(mlmodel, SCHEME_OPS[scheme.scheme]),
            "per_channel_fallback": sorted(per_channel_fallback)}


def _count_ops(mlmodel, op_type: str) -> int:
    """How many weights the compressed program really decompresses with ``op_type`` (the manifest's count)."""
    return sum(op.op_type == op_type for f in mlmodel._mil_program.functions.values() for op in f.operations)


def _weights_of(mlmodel, op_types: tuple, weight_threshold: int, cto) -> Dict[str, tuple]:
    """name -> shape of every constant (>= threshold elements) that is the matrix input of one of ``op_types``."""
    selected = {}
    for name, meta in cto.get_weights_metadata(mlmodel, weight_threshold=weight_threshold).items():
        for op in meta.child_ops:
            if op.op_type in op_types and op.params_name_mapping.get(WEIGHT_PARAMS[op.op_type]) == name:
                selected[name] = tuple(meta.val.shape)
    return selected
