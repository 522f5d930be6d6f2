"""sfedge's attention kernels (recipes 8da4w-sfedge / 8da4w-sfedge-bf16 / fp32-sfedge): the decode kernel
(attention mode "prefix", T = 1) and the prefill chunk kernel (mode "chunk", any T).

* eager: the "chunk" and "prefix" modes (PyTorch references of the ops) against the eager CachedAttention decoder;
* each C++ kernel inside a .pte (slow: compiles the library, lowers with ExecuTorch) against its reference, over
  head shapes (the AVX-512 path and the plain loops), both cache dtypes, positions crossing the decode kernel's
  128-position and the chunk kernel's 64-key blocks and row tiles, with stale cache entries past the prefix;
* an exported tiny fp32-sfedge folder through the session (prefill through the chunk kernel, every decode step
  through the decode kernel's method on the same KV cache) against eager, including a rewind.

Tolerances (max abs difference, logits ~N(0, 1)): float32 1e-4, bfloat16 cache 1.5e-1 (as tests/test_executorch_llm.py).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("executorch", reason="the executorch extra is not installed (pip install 'sfedge[executorch]')")

from sfedge.errors import UsageError  # noqa: E402
from sfedge.export import executorch_kernels  # noqa: E402
from sfedge.export.executorch_kernels import (define_ops, load_kernels, reference_chunk_attention,  # noqa: E402
                                              reference_decode_attention)
from sfedge.export.executorch_llm import flat_from_position, use_custom_ops, set_attention_mode  # noqa: E402
from sfedge.manifest import Component, read_manifest  # noqa: E402
from sfedge.models import WeightsSource, build_model  # noqa: E402
from sfedge.quantize.executorch import decoder_options  # noqa: E402
from sfedge.quantize.recipes import get_recipe  # noqa: E402
from sfedge.runtime.sessions import SessionOptions, open_session  # noqa: E402
from sfedge.runtime.sessions.eager import EagerSession  # noqa: E402
import sfedge.export.executorch  # noqa: E402,F401  (registers the exporter and the recipes)
from conftest import KERNELS_RECIPE, PREFIX_CONFIG, PREFIX_EXPORT_GROUP, PREFIX_OPTIONS  # noqa: E402

# The tiny preset cut to one vision block, with two LLM layers of width 128 (4 query heads over 2 kv heads of 32):
# the config of the shared fp32-sfedge export (tests/conftest.py), which test_executorch.py's parity also runs on.
CONFIG = PREFIX_CONFIG
HIDDEN = CONFIG.llm.hidden
TOLERANCE = {"float32": 1e-4, "bfloat16": 1.5e-1}


def _steps(decoder, embeds, plan):
    """Run (start, size) calls on a decoder module; logits of each."""
    with torch.no_grad():
        return [decoder(embeds[None, start:start + size], torch.tensor([start])) for start, size in plan]


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_chunk_then_prefix_modes_match_eager(kv_dtype):
    """Prefill in "chunk" mode, decode one token at a time in "prefix" mode (the ops' PyTorch references), on one
    cache: what the fp32-sfedge / 8da4w-sfedge(-bf16) llm.pte runs."""
    eager = build_model(CONFIG, WeightsSource(seed=0), 96).text_decoder
    swapped = copy.deepcopy(eager)
    use_custom_ops(swapped, "chunk", kv_dtype)
    embeds = torch.randn(80, HIDDEN, generator=torch.Generator().manual_seed(1))
    plan = [(0, 32), (32, 31), (63, 1), (64, 1), (65, 1)]
    reference = _steps(eager, embeds, plan)
    outputs = _steps(swapped, embeds, plan[:2])
    set_attention_mode(swapped, "prefix")
    outputs += _steps(swapped, embeds, plan[2:])
    worst = max((a - b).abs().max().item() for a, b in zip(outputs, reference))
    assert worst <= TOLERANCE[kv_dtype], f"{kv_dtype}: max abs diff {worst:.3g}"


def test_prefix_mode_refuses_more_than_one_token_and_kernels_refuse_float16():
    decoder = build_model(CONFIG, WeightsSource(seed=0), 96).text_decoder
    use_custom_ops(decoder, "prefix")
    with pytest.raises(UsageError, match="one token at a time"):
        decoder(torch.zeros(1, 2, HIDDEN), torch.tensor([0]))
    half = build_model(CONFIG, WeightsSource(seed=0), 96).text_decoder
    use_custom_ops(half, "causal", "float16")
    for mode in ("prefix", "chunk"):
        with pytest.raises(UsageError, match=f"attention '{mode}' .* float32 or bfloat16 KV caches, not float16"):
            set_attention_mode(half, mode)


def test_sfedge_recipes():
    assert decoder_options(get_recipe("executorch", "8da4w-sfedge").scheme(Component.TEXT_DECODER)) == ("float32", "sfedge")
    assert decoder_options(get_recipe("executorch", "8da4w-sfedge-bf16").scheme(Component.TEXT_DECODER)) == ("bfloat16", "sfedge")
    assert decoder_options(get_recipe("executorch", "fp32-sfedge").scheme(Component.TEXT_DECODER)) == ("float32", "sfedge")
    g128 = get_recipe("executorch", "8da4w-g128-sfedge-bf16")
    assert decoder_options(g128.scheme(Component.TEXT_DECODER)) == ("bfloat16", "sfedge")
    assert (g128.scheme(Component.TEXT_DECODER).group_size, g128.scheme(Component.TOKEN_EMBEDDING).group_size) == (128, 32)
    assert flat_from_position(6400, "sfedge") == 6400 and flat_from_position(6400, "switch") == 1920  # sfedge: one method


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (12, 2), (3, 3)])
def test_chunk_reference_matches_per_token_decode_reference(heads, kv_heads):
    """The chunk op's reference: token t of a chunk at start_pos sees exactly what a decode step at start_pos + t sees."""
    generator = torch.Generator().manual_seed(heads)
    k_cache, v_cache = torch.randn(2, 1, 90, kv_heads, 16, generator=generator)
    q = torch.randn(1, 9, heads, 16, generator=generator)
    chunk = reference_chunk_attention(q, k_cache, v_cache, 40)
    for t in range(9):
        step = reference_decode_attention(q[:, t:t + 1], k_cache, v_cache, 40 + t)
        assert torch.allclose(chunk[:, t:t + 1], step, atol=1e-6), t


def test_build_without_a_compiler_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SFEDGE_CACHE", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(executorch_kernels.shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="needs a C\\+\\+ compiler"):
        executorch_kernels.build_library()


class _KernelOnly(nn.Module):
    def __init__(self, k_cache, v_cache):
        super().__init__()
        self.register_buffer("k_cache", k_cache)
        self.register_buffer("v_cache", v_cache)

    def forward(self, q, pos):
        start = pos[0].item()
        torch._check(start >= 0)
        torch._check(start < self.k_cache.shape[1])
        return torch.ops.sfedge.decode_attention(q, self.k_cache, self.v_cache, start)


class _ChunkKernelOnly(_KernelOnly):
    def forward(self, q, pos):
        start = pos[0].item()
        torch._check(start >= 0)
        torch._check(start + q.shape[1] <= self.k_cache.shape[1])
        return torch.ops.sfedge.chunk_attention(q, self.k_cache, self.v_cache, start)


def _pte_method(module: nn.Module, example: tuple, dynamic_shapes=None):
    """The module lowered to a .pte and loaded; returns (method, the program's bytes: keep them alive while it runs)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.extension.pybindings import _C

    program = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)
    edge = to_edge_transform_and_lower(program, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    data = edge.to_executorch(ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False))).buffer
    return _C._load_for_executorch_from_buffer(data), data


@pytest.mark.slow
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 32), (12, 2, 128), (3, 3, 64)])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(heads, kv_heads, dim, kv_dtype):
    """The compiled kernel in a .pte against the PyTorch reference; positions past start_pos hold huge stale
    values that must not leak in."""
    define_ops()
    load_kernels()
    capacity = 600
    generator = torch.Generator().manual_seed(heads * dim)
    k_cache = torch.randn(1, capacity, kv_heads, dim, generator=generator).to(kv_dtype)
    v_cache = torch.randn(1, capacity, kv_heads, dim, generator=generator).to(kv_dtype)
    q = torch.randn(1, 1, heads, dim, generator=generator) * 3
    method, _data = _pte_method(_KernelOnly(k_cache.clone(), v_cache.clone()), (q, torch.tensor([5])))
    for position in (0, 1, 255, 256, 257, 511, 512, 599):
        stale_k, stale_v = k_cache.clone(), v_cache.clone()
        stale_k[0, position + 1:] = 1e4
        stale_v[0, position + 1:] = -1e4
        want = reference_decode_attention(q, k_cache, v_cache, position)
        got = method.forward([q, torch.tensor([position])])[0].reshape(want.shape)
        assert (got - want).abs().max().item() <= 2e-5, position
        assert torch.allclose(want, reference_decode_attention(q, stale_k, stale_v, position))


@pytest.mark.slow
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 32), (12, 2, 128), (3, 3, 64), (16, 1, 16), (5, 5, 40)])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_chunk_kernel_matches_reference(heads, kv_heads, dim, kv_dtype):
    """The compiled chunk kernel in a .pte (T dynamic) against the PyTorch reference: chunks of 1 .. 130 tokens at
    starts that cross its 64-key blocks and its ~96-row tiles (several tiles per kv head for 12 / 2 heads), head_dim
    40 through the plain loops. The reference reads only positions 0 .. start + tokens - 1; the kernel's cache holds
    other values past them (random, and 1e4 past position 300), which must not leak in."""
    define_ops()
    load_kernels()
    capacity = 320
    generator = torch.Generator().manual_seed(heads * dim)
    k_cache = torch.randn(1, capacity, kv_heads, dim, generator=generator)
    v_cache = torch.randn(1, capacity, kv_heads, dim, generator=generator)
    k_cache[0, 300:], v_cache[0, 300:] = 1e4, -1e4
    k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    method, _data = _pte_method(_ChunkKernelOnly(k_cache.clone(), v_cache.clone()),
                                (torch.randn(1, 2, heads, dim), torch.tensor([3])),
                                ({1: torch.export.Dim("tokens", min=1, max=130)}, None))
    for tokens, start in [(1, 0), (2, 0), (7, 5), (64, 0), (65, 63), (128, 100), (130, 170), (33, 267)]:
        q = torch.randn(1, tokens, heads, dim, generator=generator) * 3
        want = reference_chunk_attention(q, k_cache, v_cache, start)
        got = method.forward([q, torch.tensor([start])])[0].reshape(want.shape)
        assert (got - want).abs().max().item() <= 5e-5, (tokens, start)


@pytest.fixture(scope="module")
def kernels_folder(executorch_export) -> Path:
    """fp32-sfedge of CONFIG with a 320-slot cache, prefill chunks of 32 (conftest.py's PREFIX_OPTIONS): shared, read only."""
    assert (PREFIX_OPTIONS["max_context"], PREFIX_OPTIONS["prefill_chunk"]) == (320, 32)  # what the plans below assume
    return executorch_export(KERNELS_RECIPE)


@pytest.mark.slow
@PREFIX_EXPORT_GROUP
def test_kernel_methods_match_eager(kernels_folder):
    """fp32-sfedge: one decoder method for prefill chunks (sfedge's chunk kernel) and decode steps (the chunk op hands a
    single token to sfedge's decode kernel) on one KV cache, across the kernels' blocks; then a rewind (a new, shorter
    prompt over the old conversation's entries): logits within 1e-4 of eager fp32 at every step."""
    decoder = read_manifest(kernels_folder).component(Component.TEXT_DECODER)
    assert "decode_method" not in decoder.extra and "decode_method_from_position" not in decoder.extra
    assert decoder.extra["sfedge_kernels"] is True and decoder.extra["attention_mode"] == "sfedge"
    assert "sfedge.chunk_attention" in decoder.extra["attention"]
    session = open_session(kernels_folder)
    assert session._decoder_program().method_names.isdisjoint({"text_decoder_flat"})  # nothing to re-pack weights for
    eager = EagerSession.open(kernels_folder, read_manifest(kernels_folder), SessionOptions())
    embeds = torch.randn(320, HIDDEN, generator=torch.Generator().manual_seed(3))
    plan = [(0, 32), (32, 1), (33, 32), (65, 32), (97, 32), (129, 32), (161, 32), (193, 32), (225, 30), (255, 1),
            (256, 1), (257, 1), (258, 32), (290, 1)]
    plan += [(0, 20), (20, 1), (21, 1)]  # rewind: positions 22.. still hold the first conversation
    for start, size in plan:
        got, want = session.decode(embeds[start:start + size], start), eager.decode(embeds[start:start + size], start)
        assert (got - want).abs().max().item() <= 1e-4, (start, size)


@pytest.mark.slow
@PREFIX_EXPORT_GROUP
def test_decode_context_command(kernels_folder, capsys):
    from sfedge.benchmarks import decode_context

    assert decode_context.main([str(kernels_folder), "--positions", "0,40", "--steps", "2", "--rounds", "1",
                                "--prefill", "8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 40 | session (text_decoder) | 1 |" in out and "| text_decoder prefill | 8 |" in out, out
    assert decode_context.main([str(kernels_folder), "--positions", "318"]) == 2  # 12 steps past 318 overflow 320
    assert "do not fit the KV cache" in capsys.readouterr().err
    assert decode_context.main([str(kernels_folder / "nope.pte")]) == 2
