"""Time ExecuTorch's ``llama.custom_sdpa`` kernel alone for one decode step at growing context.

    python -m sfedge.benchmarks.sdpa_probe --model sf-llava-1.5-1b --positions 100,1466,5786,9200 --threads 1,2

For a video prompt of several thousand tokens, a decode step's attention over the cache can cost
more than the weights. This probe calls the kernel that ``llm.pte`` runs (through its PyTorch
registration, the same C++ code) with the preset's head shape and an fp32 cache, so the cost per
cached position can be read without exporting anything: ms per layer, ms per token (x layers), and
the rate at which it reads k and v.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from sfedge.errors import SfedgeError, UsageError


def probe(model: str, positions: Sequence[int], threads: Sequence[Optional[int]], repeats: int = 20) -> list:
    import torch

    from sfedge.config import get_preset
    from sfedge.export.executorch_llm import load_custom_ops

    load_custom_ops()
    llm = get_preset(model).llm
    capacity = max(positions) + 1
    generator = torch.Generator().manual_seed(0)
    k_cache = torch.randn(1, capacity, llm.kv_heads, llm.head_dim, generator=generator)
    v_cache = torch.randn(1, capacity, llm.kv_heads, llm.head_dim, generator=generator)
    query = torch.randn(1, 1, llm.heads, llm.head_dim, generator=generator)
    rows = []
    for count in threads:
        if count:
            torch.set_num_threads(count)
        for position in positions:
            torch.ops.llama.custom_sdpa(query, k_cache, v_cache, position, None, 0.0, True)
            start = time.perf_counter()
            for _ in range(repeats):
                torch.ops.llama.custom_sdpa(query, k_cache, v_cache, position, None, 0.0, True)
            seconds = (time.perf_counter() - start) / repeats
            kv_bytes = (position + 1) * 2 * llm.kv_heads * llm.head_dim * 4
            rows.append({"threads": torch.get_num_threads(), "position": position, "ms_per_layer": seconds * 1e3,
                         "ms_per_token": seconds * 1e3 * llm.layers, "kv_read_gb_s": kv_bytes / seconds / 1e9})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sfedge.benchmarks.cases import parse_int_list

    parser = argparse.ArgumentParser(prog="python -m sfedge.benchmarks.sdpa_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sf-llava-1.5-1b", help="preset whose head shape to use")
    parser.add_argument("--positions", default="100,1466,5786,9200", help="cached positions before the decoded token")
    parser.add_argument("--threads", help="comma-separated thread counts (default: torch's)")
    parser.add_argument("-r", "--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        positions = parse_int_list(args.positions, "--positions")
        rows = probe(args.model, positions, parse_int_list(args.threads, "--threads"), args.repeats)
    except SfedgeError as exc:
        print(f"sdpa_probe: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    print("| threads | cached positions | ms per layer | ms per token (all layers) | k+v read GB/s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['threads']} | {row['position']:,} | {row['ms_per_layer']:.3f} | {row['ms_per_token']:.1f} | "
              f"{row['kv_read_gb_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
