"""sfedge's own ExecuTorch kernel library (export/kernels/): two attention kernels over the static KV cache.

* ``sfedge::decode_attention`` (decode_attention.cpp): one decode token's attention over the used prefix,
  each cached row read once for all the query heads that share it (float32 or bfloat16 cache).
  executorch 1.5.1's ``llama.custom_sdpa`` has no such path: its causal mode re-reads every kv head per
  query head as M = 1 GEMVs, its masked mode reads the whole ``max_seq_len`` cache.
* ``sfedge::chunk_attention`` (chunk_attention.cpp): a prefill chunk's causal attention (T tokens at
  ``start_pos``) as a flash-attention loop with the query heads of a kv head folded into ~96-row tiles;
  custom_sdpa runs the same chunk at a third of PyTorch's own SDPA rate (docs/executorch.md).

(see export/executorch_llm.py and docs/executorch.md)

* ``define_ops()`` registers the PyTorch side (``torch.ops.sfedge.decode_attention`` and its ``.out``
  variant, a PyTorch reference implementation and a fake-tensor rule), so ``torch.export`` can trace it
  and ``to_executorch`` finds the out variant.
* ``load_kernels()`` compiles the C++ source once against the installed executorch wheel's headers and
  ``libexecutorch.so`` (g++, cached under ``$SFEDGE_CACHE`` or ``~/.cache/sfedge/kernels`` keyed by the
  source, the flags and the executorch version) and loads it, which registers the kernel with the
  ExecuTorch runtime the Python bindings use. The .pte files of recipes that use it need this library
  loaded (the session does it when the manifest says so); ExecuTorch's stock runners do not have it.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import math
import os
import shutil
import subprocess
from pathlib import Path

import torch

from sfedge.errors import UsageError

SOURCES = tuple(Path(__file__).with_name("kernels") / name for name in ("decode_attention.cpp", "chunk_attention.cpp"))
LIBRARY_NAME = "libsfedge_executorch_kernels.so"
OP_NAMESPACE, OP_NAME, CHUNK_OP_NAME = "sfedge", "decode_attention", "chunk_attention"
_library = None  # torch.library.Library keeping the op definitions alive
_loaded: dict = {}


def _executorch_root() -> Path:
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("sfedge's ExecuTorch kernels need executorch: pip install 'sfedge[executorch]'")
    return Path(list(spec.submodule_search_locations)[0])


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compile_flags() -> list:
    """Vector ISA for the compiler's vectoriser: AVX-512 where the CPU has it, else AVX2 + FMA, else baseline."""
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2"]
    if {"avx2", "fma"} <= flags:
        return ["-mavx2", "-mfma"]
    return []


def _cache_dir() -> Path:
    return Path(os.environ.get("SFEDGE_CACHE", Path.home() / ".cache" / "sfedge")) / "kernels"


def build_library() -> Path:
    """Compile the kernel library (once per source / flags / executorch version); returns its path."""
    root = _executorch_root()
    include, lib = root / "include", root / "lib"
    if not (include / "executorch" / "runtime" / "kernel" / "kernel_includes.h").is_file() or not (lib / "libexecutorch.so").is_file():
        raise UsageError(f"the executorch wheel at {root} has no C++ headers or libexecutorch.so: sfedge's decode kernel "
                         f"cannot be built; use a recipe without it (e.g. 8da4w-flat)")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise UsageError("building sfedge's ExecuTorch decode kernel needs a C++ compiler (g++): install one or use a "
                         "recipe without it (e.g. 8da4w-flat)")
    version = getattr(importlib.import_module("executorch.version"), "__version__", "?")
    command = [compiler, "-std=c++17", "-O3", "-ffast-math", *compile_flags(), "-fPIC", "-shared", "-DET_USE_THREADPOOL",
               "-DC10_USING_CUSTOM_GENERATED_MACROS", f"-I{include}",
               f"-I{include / 'executorch' / 'runtime' / 'core' / 'portable_type' / 'c10'}", *map(str, SOURCES),
               f"-L{lib}", "-lexecutorch", "-lexecutorch_threadpool", f"-Wl,-rpath,{lib}"]
    sources = "".join(source.read_bytes().hex() for source in SOURCES)
    key = hashlib.sha256((sources + " ".join(command[1:]) + version).encode()).hexdigest()[:16]
    target = _cache_dir() / key / LIBRARY_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    result = subprocess.run([*command, "-o", str(partial)], capture_output=True, text=True)
    if result.returncode != 0:
        raise UsageError(f"building {', '.join(source.name for source in SOURCES)} failed ({compiler} exit {result.returncode}): "
                         f"{(result.stderr.strip().splitlines() or ['no output'])[0]}")
    partial.replace(target)
    return target


def load_kernels() -> Path:
    """Build (if needed) and load the library: registers ``sfedge::decode_attention.out`` and
    ``sfedge::chunk_attention.out`` with ExecuTorch."""
    if "path" not in _loaded:
        from executorch.extension.pybindings import _C  # noqa: F401  (loads libexecutorch.so first)

        path = build_library()
        _loaded["handle"] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        _loaded["path"] = path
    return _loaded["path"]


def reference_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start_pos: int) -> torch.Tensor:
    """What the kernel computes, in PyTorch: q [1, 1, H, D] over cache positions 0..start_pos -> [1, 1, H, D]."""
    heads, dim = q.shape[2], q.shape[3]
    kv_heads = k_cache.shape[2]
    keys = k_cache[0, :start_pos + 1].float()  # [P, Hkv, D]
    values = v_cache[0, :start_pos + 1].float()
    query = q[0, 0].float().reshape(kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("hrd,phd->hrp", query, keys) / math.sqrt(dim)
    out = torch.einsum("hrp,phd->hrd", torch.softmax(scores, dim=-1), values)
    return out.reshape(1, 1, heads, dim).to(q.dtype)


def reference_chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start_pos: int) -> torch.Tensor:
    """What the chunk kernel computes, in PyTorch: q [1, T, H, D] at positions start_pos .. start_pos + T - 1,
    token t attending to cache positions 0 .. start_pos + t -> [1, T, H, D]."""
    tokens, heads = q.shape[1], q.shape[2]
    used = start_pos + tokens
    kv_heads = k_cache.shape[2]
    keys = k_cache[:, :used].float().transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)  # [1, H, P, D]
    values = v_cache[:, :used].float().transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    visible = torch.arange(used)[None, :] <= (start_pos + torch.arange(tokens))[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q.float().transpose(1, 2), keys, values, attn_mask=visible)
    return out.transpose(1, 2).to(q.dtype)


def _define_attention_op(library, name: str, reference) -> None:
    """One (q, k_cache, v_cache, start_pos) -> q-shaped op and its ``.out`` variant: the PyTorch reference for eager
    runs, a fake-tensor rule for tracing (the C++ kernel registers the ``.out`` variant with ExecuTorch)."""
    library.define(f"{name}(Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos) -> Tensor")
    library.define(f"{name}.out(Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos, *, Tensor(a!) out) -> Tensor(a!)")

    def out_variant(q, k_cache, v_cache, start_pos, *, out):
        out.copy_(reference(q, k_cache, v_cache, start_pos))
        return out

    library.impl(name, reference, "CompositeExplicitAutograd")
    library.impl(f"{name}.out", out_variant, "CompositeExplicitAutograd")
    library.impl(name, lambda q, k_cache, v_cache, start_pos: torch.empty_like(q), "Meta")
    library.impl(f"{name}.out", lambda q, k_cache, v_cache, start_pos, *, out: out, "Meta")


def define_ops() -> None:
    """Register ``torch.ops.sfedge.decode_attention`` and ``chunk_attention`` (+ ``.out``) for tracing and eager
    use (idempotent)."""
    global _library
    if _library is not None:
        return
    library = torch.library.Library(OP_NAMESPACE, "DEF")
    _define_attention_op(library, OP_NAME, reference_decode_attention)
    _define_attention_op(library, CHUNK_OP_NAME, reference_chunk_attention)
    _library = library
