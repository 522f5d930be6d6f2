"""Time ExecuTorch's ``llama.custom_sdpa`` kernel alone for one decode step at growing context.

    python -m sfedge.benchmarks.sdpa_probe --model sf-llava-1.5-1b --positions 100,1466,5786 --threads 2 \\
        --modes causal,gqa-masked --blas-threads 2,1 --capacity 6144

For a video prompt of several thousand tokens, a decode step's attention over the cache can cost
more than the weights. This probe calls the kernel that ``llm.pte`` runs (through its PyTorch
registration, the same C++ code) with the preset's head shape, exactly as each attention mode of
export/executorch_llm.py calls it, so the cost per cached position can be read without exporting
anything: ms per layer, ms per token (x layers), and the rate at which it reads k and v.

``--threads`` sets ExecuTorch's thread pool (the one llm.pte runs on); ``--blas-threads`` sets
PyTorch's (MKL/OpenMP) thread count while the kernel runs: custom_sdpa's GEMMs call MKL from inside
the pool, so anything but 1 nests OpenMP teams in the pool's threads (the runtime uses 1).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Optional, Sequence

from sfedge.errors import SfedgeError, UsageError


def probe(model: str, positions: Sequence[int], threads: Sequence[Optional[int]], repeats: int = 20,
          modes: Sequence[str] = ("causal",), blas_threads: Sequence[int] = (1,), capacity: Optional[int] = None,
          kv_dtype: str = "float32") -> list:
    import torch

    from sfedge.config import get_preset
    from sfedge.export.executorch_llm import ATTENTION_MODES, CustomOpAttention, kv_torch_dtype, load_custom_ops
    from sfedge.models.llm import KVCache

    load_custom_ops()
    from executorch.extension.pybindings import _C

    for mode in modes:
        if mode not in ATTENTION_MODES:
            raise UsageError(f"--modes: {mode!r} is unknown; use one of: {', '.join(ATTENTION_MODES)}")
    llm = get_preset(model).llm
    capacity = capacity or max(positions) + 1
    if capacity <= max(positions):
        raise UsageError(f"--capacity {capacity} must exceed the largest position {max(positions)}")
    dtype = kv_torch_dtype(kv_dtype)
    generator = torch.Generator().manual_seed(0)
    cache = KVCache(capacity, llm.kv_heads, llm.head_dim, dtype)
    cache.k_cache.copy_(torch.randn(cache.k_cache.shape, generator=generator))
    cache.v_cache.copy_(torch.randn(cache.v_cache.shape, generator=generator))
    query = torch.randn(1, 1, llm.heads, llm.head_dim, generator=generator).to(dtype)
    attention = {mode: CustomOpAttention(cache, mode) for mode in modes}
    torch_threads = torch.get_num_threads()
    rows = []
    for count in threads:
        if count:
            _C._unsafe_reset_threadpool(count)
        for blas in blas_threads:
            for mode in modes:
                for position in positions:
                    if mode == "causal":
                        def step():
                            torch.ops.llama.custom_sdpa(query, cache.k_cache, cache.v_cache, position, None, 0.0, True)
                    else:
                        def step():
                            attention[mode]._gqa_masked(query, position, 1)
                    torch.set_num_threads(blas)
                    step()
                    times = []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        step()
                        times.append(time.perf_counter() - start)
                    torch.set_num_threads(torch_threads)
                    seconds = statistics.median(times)
                    read = (position + 1) if mode == "causal" else capacity  # positions the kernel reads
                    kv_bytes = read * 2 * llm.kv_heads * llm.head_dim * dtype.itemsize
                    rows.append({"threads": _C._threadpool_get_thread_count(), "blas_threads": blas, "mode": mode,
                                 "position": position, "ms_per_layer": seconds * 1e3, "min_ms": min(times) * 1e3,
                                 "ms_per_token": seconds * 1e3 * llm.layers, "kv_read_gb_s": kv_bytes / seconds / 1e9})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sfedge.benchmarks.cases import parse_int_list

    parser = argparse.ArgumentParser(prog="python -m sfedge.benchmarks.sdpa_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sf-llava-1.5-1b", help="preset whose head shape to use")
    parser.add_argument("--positions", default="100,1466,5786,9200", help="cached positions before the decoded token")
    parser.add_argument("--threads", help="comma-separated ExecuTorch thread-pool sizes (default: the pool's)")
    parser.add_argument("--blas-threads", default="1", help="comma-separated PyTorch/MKL thread counts while the kernel runs")
    parser.add_argument("--modes", default="causal", help="attention modes: causal, gqa-masked (comma-separated)")
    parser.add_argument("--capacity", type=int, help="KV-cache length (--max-context); default: largest position + 1")
    parser.add_argument("--kv-dtype", default="float32", help="float32, float16 or bfloat16")
    parser.add_argument("-r", "--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        positions = parse_int_list(args.positions, "--positions")
        rows = probe(args.model, positions, parse_int_list(args.threads, "--threads"), args.repeats,
                     [m.strip() for m in args.modes.split(",") if m.strip()],
                     parse_int_list(args.blas_threads, "--blas-threads"), args.capacity, args.kv_dtype)
    except SfedgeError as exc:
        print(f"sdpa_probe: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    print("| threads | blas threads | mode | cached positions | ms per layer (median) | min | ms per token (all layers) | k+v read GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['threads']} | {row['blas_threads']} | {row['mode']} | {row['position']:,} | {row['ms_per_layer']:.3f} | "
              f"{row['min_ms']:.3f} | {row['ms_per_token']:.1f} | {row['kv_read_gb_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
