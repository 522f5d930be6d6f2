"""ExecuTorch (XNNPACK) quantization recipes, as data, and the source transform that applies them.

Vocabulary (ExecuTorch / optimum-executorch): ``8da4w`` = int8 dynamic activations x int4 weights
(per group), ``8da8w`` = int8 dynamic activations x int8 weights (per channel); token embeddings take
weight-only ``8w`` / ``4w`` (gathered by ExecuTorch's quantized embedding kernels, not XNNPACK).
Every recipe quantizes *before* ``torch.export`` with torchao through
``executorch.extension.llm.export.quantize.quantize_model_``.

Weight-only linears (``4w``, ``8w``) lower through XNNPACK without error but give wrong logits on
this stack (max abs diff 170 and 2,100 on a tiny model, see docs/executorch.md), so they are refused
with an explanation rather than offered.
"""
from __future__ import annotations

import contextlib
import io
from typing import Optional

from torch import nn

from sfedge.errors import UsageError
from sfedge.manifest import Component
from sfedge.quantize.executorch_hqq import fast_hqq
from sfedge.quantize.recipes import (
    FP32_TOLERANCE, INT4_TOLERANCE, INT8_TOLERANCE, RECIPES, SIMULATORS, ComponentScheme, per_part, Recipe, register_recipe, uniform,
)
from sfedge.registry import Registry

BACKEND = "executorch"

FP32 = ComponentScheme("fp32")
LINEAR_8DA8W = ComponentScheme("8da8w", group_size=0)  # group 0 = per output channel
LINEAR_8DA4W_G32 = ComponentScheme("8da4w", group_size=32)
LINEAR_8DA4W_G128 = ComponentScheme("8da4w", group_size=128)
EMBEDDING_8W = ComponentScheme("8w", group_size=0)
EMBEDDING_4W = ComponentScheme("4w", group_size=32)

LINEAR_SCHEMES = ("8da4w", "8da8w")  # what quantize_linears accepts
# Vision-encoder schemes applied while tracing (export/executorch_vision.py), not by torchao beforehand:
# static int8 (PT2E + XNNPACKQuantizer, calibrated) and float16 inside the delegate.
VISION_STATIC_INT8 = ComponentScheme("int8-static", group_size=0)
VISION_FP16 = ComponentScheme("fp16")
VISION_TRACE_SCHEMES = (VISION_STATIC_INT8.scheme, VISION_FP16.scheme)
EMBEDDING_SCHEMES = ("8w", "4w")  # what quantize_embeddings accepts

# Weight-only linear schemes: asked for by name, refused with the reason.
REFUSED = {
    "4w": "int4 weight-only linears",
    "8w": "int8 weight-only linears",
    "int4": "int4 weight-only linears",
    "int8": "int8 weight-only linears",
}
REFUSED_REASON = ("lower through XNNPACK without error but give silently wrong logits with executorch 1.5.1 + "
                  "torchao 0.18.0 (max abs diff 170 and 2,100 against eager on a tiny model)")


class _ExecuTorchRecipes(Registry):
    """The executorch recipe registry: names of refused schemes get their reason, not just 'unknown'."""

    def get(self, name: str) -> Recipe:
        if name in REFUSED and name not in self:
            raise UsageError(f"executorch recipe {name!r} ({REFUSED[name]}) is refused: weight-only linears {REFUSED_REASON}; "
                             f"use one of: {', '.join(self.names())} (8da4w / 8da8w quantize activations too and are verified)")
        return super().get(name)


RECIPES.setdefault(BACKEND, _ExecuTorchRecipes(f"{BACKEND} quantization recipe"))

def _llm(linear: ComponentScheme, embedding: ComponentScheme = FP32) -> dict:
    return per_part(vision=LINEAR_8DA8W, decoder=linear, embedding=embedding)


def _with_vision(parts: dict, vision: ComponentScheme) -> dict:
    """``parts`` with another vision-encoder scheme (the projector keeps its own)."""
    return {**parts, Component.VISION_ENCODER.value: vision}


register_recipe(Recipe("fp32", BACKEND, "fp32 everywhere (the parity baseline)", uniform(FP32), FP32_TOLERANCE))
register_recipe(Recipe("8da8w", BACKEND, "int8 dynamic activations x int8 per-channel weights for every linear; fp32 token embedding",
                       _llm(LINEAR_8DA8W), INT8_TOLERANCE))
register_recipe(Recipe("8da4w-g128", BACKEND, "as 8da4w with weight groups of 128 (smaller, slightly less exact)",
                       _llm(LINEAR_8DA4W_G128), INT4_TOLERANCE))
register_recipe(Recipe("8da4w-emb8", BACKEND, "8da4w with an int8 per-row token embedding",
                       _llm(LINEAR_8DA4W_G32, EMBEDDING_8W), INT4_TOLERANCE))
register_recipe(Recipe("8da4w-emb4", BACKEND, "8da4w with an int4 (group 32) token embedding (the same as 8da4w, by its old name)",
                       _llm(LINEAR_8DA4W_G32, EMBEDDING_4W), INT4_TOLERANCE))
# Vision encoder in static int8 (PT2E + XNNPACKQuantizer, calibrated on synthetic frames): ~10% faster than
# 8da8w on the 1B encoder (docs/executorch.md), but its activation ranges come from the calibration frames.
register_recipe(Recipe("8da4w-vstatic", BACKEND, "8da4w with a static int8 vision encoder (PT2E, calibrated)",
                       _with_vision(_llm(LINEAR_8DA4W_G32, EMBEDDING_4W), VISION_STATIC_INT8), INT4_TOLERANCE))


# --- The LLM's default and its KV-cache / attention options (text_decoder scheme options) ---------
# ``kv_dtype``: the cache dtype (float32 / float16 / bfloat16: llama.custom_sdpa and update_cache take
# all three). ``attention``: "causal" (reads the cached prefix, one query row per head),
# "gqa-masked" (the query heads of a kv head folded into one GEMM over the whole cache: decode cost
# flat in the context, set by --max-context), "switch" (both methods, the runtime picks by position) or
# "sfedge" (one method: sfedge's chunk kernel for prefill, its decode kernel for every decode step).
# See export/executorch_llm.py and docs/executorch.md.
KV_DTYPE_DEFAULT, ATTENTION_DEFAULT = "float32", "causal"


def decoder_options(scheme: ComponentScheme) -> tuple:
    """(kv_dtype, attention) of a text_decoder scheme, defaults filled in."""
    return (str(scheme.options.get("kv_dtype", KV_DTYPE_DEFAULT)), str(scheme.options.get("attention", ATTENTION_DEFAULT)))


def _with_options(scheme: ComponentScheme, **options) -> ComponentScheme:
    return ComponentScheme(scheme.scheme, scheme.group_size, {**scheme.options, **options})


# 8da4w: the 1B's llm.pte drops from 1.7 GiB (fp32 table: 890 MiB) to <= 1.0 GiB with the int4 table,
# as ExecuTorch's own Llama export does (--embedding-quantize 4,32).
register_recipe(Recipe("8da4w", BACKEND, "LLM linears int8 dyn. act. x int4 weights group 32; int4 (group 32) token embedding; "
                       "vision + projector 8da8w; fp32 KV cache", _llm(LINEAR_8DA4W_G32, EMBEDDING_4W), INT4_TOLERANCE))
register_recipe(Recipe("8da4w-embfp32", BACKEND, "8da4w with the fp32 token embedding (the default before; 1B llm.pte 1.7 GiB)",
                       _llm(LINEAR_8DA4W_G32), INT4_TOLERANCE))
register_recipe(Recipe("8da4w-kv16", BACKEND, "8da4w with a float16 KV cache (half the cache bytes)",
                       _llm(_with_options(LINEAR_8DA4W_G32, kv_dtype="float16"), EMBEDDING_4W), INT4_TOLERANCE))
register_recipe(Recipe("8da4w-kvbf16", BACKEND, "8da4w with a bfloat16 KV cache (half the cache bytes)",
                       _llm(_with_options(LINEAR_8DA4W_G32, kv_dtype="bfloat16"), EMBEDDING_4W), INT4_TOLERANCE))
register_recipe(Recipe("8da4w-flat", BACKEND, "8da4w plus a second decode method (gqa-masked, over the same KV cache) used "
                       "past 30% of --max-context: decode stays flat as the context grows",
                       _llm(_with_options(LINEAR_8DA4W_G32, attention="switch"), EMBEDDING_4W), INT4_TOLERANCE))
# attention "sfedge": sfedge's own kernels (export/kernels/, built with g++ on first use): prefill chunks through
# chunk_attention.cpp (a flash-attention loop with the query heads of a kv head folded into row tiles, ~5x
# llama.custom_sdpa on a 1B prefill chunk at video context lengths), decode steps through decode_attention.cpp
# (reads only the cache positions in use, each row once for all the query heads sharing it), called by the
# chunk op for a single token, so one method serves both; the bfloat16 cache halves the bytes both read. (These replace the "prefix" recipes of
# earlier versions, which prefilled through custom_sdpa: same decode, slower prefill.)
register_recipe(Recipe("8da4w-sfedge", BACKEND, "8da4w with sfedge's attention kernels for prefill chunks and decode steps "
                       "(used cache prefix only); fp32 KV cache",
                       _llm(_with_options(LINEAR_8DA4W_G32, attention="sfedge"), EMBEDDING_4W), INT4_TOLERANCE))
register_recipe(Recipe("8da4w-sfedge-bf16", BACKEND, "8da4w-sfedge with a bfloat16 KV cache (half the cache bytes)",
                       _llm(_with_options(LINEAR_8DA4W_G32, attention="sfedge", kv_dtype="bfloat16"), EMBEDDING_4W),
                       INT4_TOLERANCE))
# Group 128 instead of 32: XNNPACK 1.5.1's blockwise 4-bit GEMM (qd8-f32-qb4w) runs 1.4-2x faster with the longer
# blocks on a 1,536 x 8,960 linear (2-core AVX-512 Xeon, quiet; /work/scratch/s7/xnn_gemm_probe.py: 512 rows 457 ->
# 665 GOPS, 128 rows 371 -> 782), and stores 4.125 instead of 4.5 bits per weight; the common choice of 4-bit LLM
# exports (GPTQ / AWQ use 128). Accuracy: coarser scales than group 32, checked by the same INT4 parity tolerance.
register_recipe(Recipe("8da4w-g128-sfedge-bf16", BACKEND, "8da4w-sfedge-bf16 with LLM linears in groups of 128 (faster "
                       "XNNPACK GEMMs; the fastest ExecuTorch recipe for video prompts)",
                       _llm(_with_options(LINEAR_8DA4W_G128, attention="sfedge", kv_dtype="bfloat16"), EMBEDDING_4W),
                       INT4_TOLERANCE))
register_recipe(Recipe("fp32-sfedge", BACKEND, "fp32 everywhere with the attention kernels of 8da4w-sfedge (parity of the attention alone)",
                       {**uniform(FP32), Component.TEXT_DECODER.value: ComponentScheme("fp32", None, {"attention": "sfedge"})},
                       FP32_TOLERANCE))
register_recipe(Recipe("fp32-flat", BACKEND, "fp32 everywhere with the flat decode method of 8da4w-flat (parity of the attention alone)",
                       {**uniform(FP32), Component.TEXT_DECODER.value: ComponentScheme("fp32", None, {"attention": "switch"})},
                       FP32_TOLERANCE))


def _quantize_model_():
    try:
        from executorch.extension.llm.export.quantize import quantize_model_
    except ModuleNotFoundError as exc:
        raise UsageError(f"ExecuTorch quantization needs {exc.name}: pip install 'sfedge[executorch]'") from None
    return quantize_model_


def _check_groups(module: nn.Module, kind: type, scheme: ComponentScheme, component: str) -> None:
    group = scheme.group_size or 0
    for name, child in module.named_modules():
        if isinstance(child, kind) and group and child.weight.shape[-1] % group:
            raise UsageError(f"{component}: layer {name} has input width {child.weight.shape[-1]}, not a multiple of "
                             f"the recipe's {scheme.scheme} group size {group}: choose a recipe with a smaller group")


def quantize_component(module: nn.Module, component: str, scheme: ComponentScheme) -> Optional[dict]:
    """Quantize ``module`` in place per ``scheme`` (before torch.export); returns the manifest's quantization dict."""
    if scheme.scheme == "fp32":
        return scheme.to_dict()  # options (kv_dtype, attention) are applied by the exporter, not here
    if component == Component.VISION_ENCODER.value and scheme.scheme in VISION_TRACE_SCHEMES:
        return scheme.to_dict()  # applied by the exporter's tracer; the eager reference stays fp32
    embedding = component == Component.TOKEN_EMBEDDING.value
    allowed = EMBEDDING_SCHEMES if embedding else LINEAR_SCHEMES
    if scheme.scheme not in allowed:
        raise UsageError(f"{component}: ExecuTorch scheme {scheme.scheme!r} is not supported here; use one of: {', '.join(allowed)}")
    _check_groups(module, nn.Embedding if embedding else nn.Linear, scheme, component)
    quantize_model_ = _quantize_model_()
    # quantize_model_ prints its own progress lines; its HQQ qparams come from sfedge's faster, bit-identical loop
    with contextlib.redirect_stdout(io.StringIO()), fast_hqq():
        if embedding:
            quantize_model_(module, qembedding_config=scheme.scheme, qembedding_group_size=scheme.group_size or 0)
        else:
            quantize_model_(module, qlinear_config=scheme.scheme, qlinear_group_size=scheme.group_size or 0)
    return scheme.to_dict()


def embedding_table_bytes(vocab: int, hidden: int, scheme: ComponentScheme) -> int:
    """Bytes of the token-embedding table as stored in llm.pte (weights + fp32 scales; zero points ignored).

    The benchmarks subtract it from llm.pte's size: a decode step gathers one row of it, while the
    separately quantized lm_head (inside the decoder) is read in full."""
    values = vocab * hidden
    if scheme.scheme == "fp32":
        return values * 4
    bits = {"8w": 8, "4w": 4}[scheme.scheme]
    groups = vocab * (hidden // scheme.group_size if scheme.group_size else 1)
    return values * bits // 8 + groups * 4


def simulate_recipe(model: nn.Module, recipe: Recipe) -> None:
    """Quantize an eager SFLlava in place exactly as the exporter does (parity's simulated reference)."""
    for component in Component:
        quantize_component(getattr(model, component.value), component.value, recipe.scheme(component))


SIMULATORS[BACKEND] = simulate_recipe
