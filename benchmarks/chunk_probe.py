"""Time one prefill chunk's attention kernel inside a .pte: ExecuTorch's ``llama.custom_sdpa`` vs sfedge's chunk kernel.

    python -m sfedge.benchmarks.chunk_probe --model sf-llava-1.5-1b --tokens 128 --positions 2500,5000,9000 --threads 2

Each mode's op is lowered alone into a .pte (T dynamic, the preset's head shape, a float32 or bfloat16
cache of ``--capacity`` slots as buffers) and run through ExecuTorch's Python bindings, so both run the
C++ kernels llm.pte runs (the chunk kernel's PyTorch registration is only a reference implementation).
Prints ms per call (min of ``--repeats``), GFLOP/s (4 x T x (position + T/2) x heads x head_dim FLOPs) and
us per cached position per token over all layers, the cost model's attention coefficient.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from sfedge.errors import SfedgeError, UsageError

MODES = {"causal": "llama.custom_sdpa (causal)", "chunk": "sfedge.chunk_attention"}


def _method(mode: str, k_cache, v_cache, heads: int, max_tokens: int):
    """(loaded .pte method, the program bytes: keep them alive while the method runs)."""
    import torch
    from torch import nn

    from executorch.extension.pybindings import _C
    from sfedge.export.executorch import _trace, lower_programs

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k_cache", k_cache)
            self.register_buffer("v_cache", v_cache)

        def forward(self, q, pos):
            start = pos[0].item()
            torch._check(start >= 0)
            torch._check(start + q.shape[1] <= self.k_cache.shape[1])
            if mode == "chunk":
                return torch.ops.sfedge.chunk_attention(q, self.k_cache, self.v_cache, start)
            return torch.ops.llama.custom_sdpa(q.to(self.k_cache.dtype), self.k_cache, self.v_cache, start, None, 0.0, True)

    example = (torch.zeros(1, 2, heads, k_cache.shape[3]), torch.tensor([0]))
    program = _trace(Attend(), example, ({1: torch.export.Dim("tokens", min=1, max=max_tokens)}, None))
    data = lower_programs({"forward": program}, per_op_linears=False)
    return _C._load_for_executorch_from_buffer(data), data


def probe(model: str, tokens: int, positions: Sequence[int], threads: int, modes: Sequence[str], capacity: int,
          kv_dtype: str = "float32", repeats: int = 7) -> list:
    import torch

    from executorch.extension.pybindings import _C
    from sfedge.config import get_preset
    from sfedge.export.executorch_kernels import define_ops, load_kernels
    from sfedge.export.executorch_llm import kv_torch_dtype, load_custom_ops

    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise UsageError(f"--modes: {', '.join(unknown)} unknown; use {', '.join(MODES)}")
    if max(positions) + tokens > capacity:
        raise UsageError(f"--positions up to {max(positions)} plus --tokens {tokens} exceed --capacity {capacity}")
    load_custom_ops()
    define_ops()
    if "chunk" in modes:
        load_kernels()
    llm = get_preset(model).llm
    generator = torch.Generator().manual_seed(0)
    dtype = kv_torch_dtype(kv_dtype)
    k_cache = torch.randn(1, capacity, llm.kv_heads, llm.head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(1, capacity, llm.kv_heads, llm.head_dim, generator=generator).to(dtype)
    query = torch.randn(1, tokens, llm.heads, llm.head_dim, generator=generator)
    _C._unsafe_reset_threadpool(threads)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the session runs llm.pte (custom_sdpa's GEMMs call MKL inside the pool)
    rows = []
    try:
        for mode in modes:
            method, _data = _method(mode, k_cache, v_cache, llm.heads, tokens)
            for position in positions:
                inputs = [query, torch.tensor([position])]
                method.forward(inputs)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    method.forward(inputs)
                    times.append(time.perf_counter() - start)
                seconds = min(times)
                flops = 4 * tokens * (position + tokens / 2) * llm.heads * llm.head_dim
                rows.append({"mode": mode, "tokens": tokens, "position": position, "ms": seconds * 1e3,
                             "gflops": flops / seconds / 1e9,
                             "us_per_position_token": seconds / tokens / (position + tokens / 2) * llm.layers * 1e6})
    finally:
        torch.set_num_threads(torch_threads)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sfedge.benchmarks.cases import parse_int_list

    parser = argparse.ArgumentParser(prog="python -m sfedge.benchmarks.chunk_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sf-llava-1.5-1b", help="preset whose head shape to use")
    parser.add_argument("--tokens", type=int, default=128, help="tokens in the chunk (the export's --prefill-chunk)")
    parser.add_argument("--positions", default="0,2500,5000,9000", help="cached positions before the chunk")
    parser.add_argument("--threads", type=int, default=2, help="ExecuTorch thread-pool size")
    parser.add_argument("--modes", default="causal,chunk", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--capacity", type=int, default=10240, help="KV-cache slots (--max-context)")
    parser.add_argument("--kv-dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("-r", "--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    try:
        if args.tokens < 1 or args.threads < 1 or args.repeats < 1:
            raise UsageError("--tokens, --threads and --repeats must be at least 1")
        rows = probe(args.model, args.tokens, parse_int_list(args.positions, "--positions", minimum=0), args.threads,
                     [mode.strip() for mode in args.modes.split(",") if mode.strip()], args.capacity, args.kv_dtype,
                     args.repeats)
    except SfedgeError as exc:
        print(f"chunk_probe: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    print("| kernel | chunk tokens | cached positions | ms per call (min) | GFLOP/s | us per position per token (all layers) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {MODES[row['mode']]} | {row['tokens']} | {row['position']:,} | {row['ms']:.1f} | {row['gflops']:.0f} | "
              f"{row['us_per_position_token']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
