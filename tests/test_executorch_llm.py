"""The ExecuTorch LLM's attention modes and KV-cache dtypes, eagerly through the custom ops' PyTorch
registration (the same C++ kernels llm.pte runs), against the eager CachedAttention decoder.

Tolerances (max abs logit difference on the tiny decoder, logits ~N(0, 1)): fp32 cache 1e-4 (both
attention modes: the same arithmetic, reordered), float16 cache 2e-2, bfloat16 cache 1.5e-1 (k/v
rounded to 11 / 8 significant bits before the dot products)."""
from __future__ import annotations

import dataclasses
import copy

import pytest
import torch

pytest.importorskip("executorch", reason="the executorch extra is not installed (pip install 'sfedge[executorch]')")

from sfedge.config import get_preset  # noqa: E402
from sfedge.errors import UsageError  # noqa: E402
from sfedge.export.executorch_llm import ATTENTION_MODES, KV_DTYPES, CustomOpAttention, use_custom_ops  # noqa: E402
from sfedge.models import WeightsSource, build_model  # noqa: E402
from sfedge.quantize.executorch import decoder_options  # noqa: E402
from sfedge.quantize.recipes import get_recipe  # noqa: E402
from sfedge.manifest import Component  # noqa: E402

TINY = get_preset("tiny")
CONFIG = TINY.replace(llm=dataclasses.replace(TINY.llm, layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32,
                                              intermediate=256))
MAX_CONTEXT = 96
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1.5e-1}


@pytest.fixture(scope="module")
def eager_decoder():
    return build_model(CONFIG, WeightsSource(seed=0), MAX_CONTEXT).text_decoder


def _run(decoder, embeds: torch.Tensor, chunks) -> list:
    """Prefill in the given chunk sizes, then decode one position at a time; logits of every call."""
    decoder.reset_cache() if hasattr(decoder, "reset_cache") else None
    outputs, start = [], 0
    with torch.no_grad():
        for size in chunks:
            outputs.append(decoder(embeds[None, start:start + size], torch.tensor([start])))
            start += size
    return outputs


# prefix (T = 1 only) and chunk with float16 (sfedge's kernels read float32 / bfloat16): test_executorch_decode.py
@pytest.mark.parametrize("mode,kv_dtype", [(mode, kv_dtype) for mode in ATTENTION_MODES for kv_dtype in KV_DTYPES
                                           if mode != "prefix" and (mode, kv_dtype) != ("chunk", "float16")])
def test_custom_op_attention_matches_eager(eager_decoder, mode, kv_dtype):
    embeds = torch.randn(80, CONFIG.llm.hidden, generator=torch.Generator().manual_seed(1))
    chunks = [32, 31, 1, 1, 1, 13, 1]  # prefill chunks and decode steps, ending near the cache's end
    reference = _run(eager_decoder, embeds, chunks)
    swapped = copy.deepcopy(eager_decoder)
    assert use_custom_ops(swapped, mode, kv_dtype) == CONFIG.llm.layers
    assert swapped.layers[0].self_attn.attend.cache.k_cache.dtype == KV_DTYPES[kv_dtype]
    outputs = _run(swapped, embeds, chunks)
    worst = max((a - b).abs().max().item() for a, b in zip(outputs, reference))
    assert worst <= TOLERANCE[kv_dtype], f"{mode} / {kv_dtype}: max abs diff {worst:.3g}"


def test_gqa_masked_ignores_stale_cache_entries(eager_decoder):
    """Positions past the current one hold an earlier conversation's k/v: the mask must hide them."""
    embeds = torch.randn(40, CONFIG.llm.hidden, generator=torch.Generator().manual_seed(2))
    swapped = copy.deepcopy(eager_decoder)
    use_custom_ops(swapped, "gqa-masked")
    with torch.no_grad():
        swapped(torch.randn(1, 40, CONFIG.llm.hidden), torch.tensor([0]))  # fills 0..39 with another prompt
        fresh = copy.deepcopy(eager_decoder)
        fresh.reset_cache()
        expected = fresh(embeds[None, :8], torch.tensor([0]))
        got = swapped(embeds[None, :8], torch.tensor([0]))
    assert (got - expected).abs().max().item() <= 1e-4


def test_unknown_options_are_refused(eager_decoder):
    with pytest.raises(UsageError, match="attention mode"):
        CustomOpAttention(eager_decoder.layers[0].self_attn.attend.cache, "sliding")
    with pytest.raises(UsageError, match="KV-cache dtype"):
        use_custom_ops(copy.deepcopy(eager_decoder), "causal", "int4")


def test_recipe_options():
    assert decoder_options(get_recipe("executorch", "8da4w").scheme(Component.TEXT_DECODER)) == ("float32", "causal")
    assert decoder_options(get_recipe("executorch", "8da4w-kv16").scheme(Component.TEXT_DECODER))[0] == "float16"
    assert decoder_options(get_recipe("executorch", "8da4w-flat").scheme(Component.TEXT_DECODER))[1] == "switch"
    default = get_recipe("executorch", "8da4w")
    assert default.scheme(Component.TOKEN_EMBEDDING).scheme == "4w"
    assert get_recipe("executorch", "8da4w-embfp32").scheme(Component.TOKEN_EMBEDDING).scheme == "fp32"
