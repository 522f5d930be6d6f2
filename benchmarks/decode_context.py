"""Decode (and prefill) speed of an ExecuTorch llm.pte at growing context, per decoder method.

    python -m sfedge.benchmarks.decode_context FOLDER_OR_LLM_PTE --positions 100,1466,5786 --steps 12 --rounds 2

For every position P and every decoder method in llm.pte (``text_decoder``: causal custom_sdpa, T = 1;
``text_decoder_flat``: the recipe's flat decode method), ``--steps`` single-token steps at P, P+1, ...
are timed with ``Method.__call__`` on ExecuTorch's thread pool (``--threads``), PyTorch's own thread count
set to 1 as the session does (``serial_blas``). A decode step costs the same whatever the cache holds, so
no prompt is prefilled first. With a folder, the row ``session`` is what ``ExecuTorchSession.decode`` runs
(the flat method from the manifest's ``decode_method_from_position`` on). Rounds alternate the methods
in one window (a shared machine: compare within a round; the CPU-time column, all threads of the
process, is less sensitive to other load than wall time). ``--prefill 128`` also times one prefill chunk
of that many tokens ending at each position.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from sfedge.errors import SfedgeError, UsageError

DECODER_METHODS = ("text_decoder", "text_decoder_flat")


def _open(path: Path):
    """(program, flat_from_position or None) for a folder with manifest.json or a bare llm.pte."""
    from sfedge.runtime.sessions.executorch import _load_library, _runtime

    flat_from, needs_kernels = None, True
    if path.is_dir():
        from sfedge.manifest import Component, read_manifest

        decoder = read_manifest(path).component(Component.TEXT_DECODER)
        # the session decodes through the flat method from this position on (never, for one-method folders)
        flat_from = int(decoder.extra.get("decode_method_from_position", decoder.extra["max_seq_len"]))
        needs_kernels = bool(decoder.extra.get("sfedge_kernels"))
        path = path / decoder.file
    if not path.is_file():
        raise UsageError(f"{path}: no such llm.pte (give an artifact folder or an llm.pte file)")
    _load_library("custom_ops")
    _load_library("quantized")
    if needs_kernels:  # a bare llm.pte may use sfedge::decode_attention: have it registered
        from sfedge.export.executorch_kernels import load_kernels

        load_kernels()
    return _runtime().load_program(str(path)), flat_from


def _time_steps(method, hidden: int, tokens: int, start: int, steps: int) -> tuple:
    """(wall seconds per step, process CPU seconds per step: all threads, pool spin-waits included)."""
    import torch

    times, cpu = [], []
    for step in range(steps + 1):  # the first call is a warm-up
        embeds = torch.randn(1, tokens, hidden)
        begin, begin_cpu = time.perf_counter(), time.process_time()
        method([embeds, torch.tensor([start + step * (tokens == 1)])])
        if step:
            times.append(time.perf_counter() - begin)
            cpu.append(time.process_time() - begin_cpu)
    return times, cpu


def _row(round_index: int, position: int, method: str, tokens: int, measured: tuple) -> dict:
    times, cpu = measured
    return {"round": round_index, "position": position, "method": method, "tokens": tokens,
            "median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "cpu_ms": statistics.median(cpu) * 1e3}


def measure(path: Path, positions: Sequence[int], steps: int = 12, rounds: int = 2, threads: Optional[int] = 2,
            prefill: int = 0) -> list:
    import torch

    from sfedge.runtime.sessions.executorch import _pybindings

    program, flat_from = _open(path)
    if threads:
        _pybindings()._unsafe_reset_threadpool(int(threads))
    methods = {name: program.load_method(name) for name in DECODER_METHODS if name in program.method_names}
    if "text_decoder" not in methods:
        raise UsageError(f"{path}: no text_decoder method (has: {', '.join(sorted(program.method_names))})")
    meta = methods["text_decoder"].method_meta()
    hidden = int(meta.input_tensor_meta(0).sizes()[-1])
    capacity = int(program.load_method("get_max_seq_len")([])[0])
    for position in positions:
        if position + max(steps, prefill) >= capacity:
            raise UsageError(f"--positions {position}: {steps} steps past it do not fit the KV cache of {capacity}")
    rows = []
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for round_index in range(rounds):
            for position in positions:
                for name, method in methods.items():
                    rows.append(_row(round_index, position, name, 1, _time_steps(method, hidden, 1, position, steps)))
                if flat_from is not None:
                    name = "text_decoder_flat" if position >= flat_from and "text_decoder_flat" in methods else "text_decoder"
                    rows.append({**rows[-len(methods) + list(methods).index(name)], "method": f"session ({name})"})
                if prefill:
                    measured = _time_steps(methods["text_decoder"], hidden, prefill, max(0, position - prefill), 2)
                    rows.append(_row(round_index, position, "text_decoder prefill", prefill, measured))
    finally:
        torch.set_num_threads(torch_threads)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sfedge.benchmarks.cases import parse_int_list

    parser = argparse.ArgumentParser(prog="python -m sfedge.benchmarks.decode_context", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="an ExecuTorch artifact folder, or an llm.pte")
    parser.add_argument("--positions", default="100,1466,5786", help="cached positions before the timed steps")
    parser.add_argument("--steps", type=int, default=12, help="decode steps timed per position and method")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all positions and methods (alternated)")
    parser.add_argument("--threads", type=int, default=2, help="ExecuTorch thread-pool size")
    parser.add_argument("--prefill", type=int, default=0, help="also time a prefill chunk of this many tokens")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    args = parser.parse_args(argv)
    try:
        if args.steps < 1 or args.rounds < 1:
            raise UsageError("--steps and --rounds must be >= 1")
        rows = measure(args.path, parse_int_list(args.positions, "--positions", minimum=0), args.steps, args.rounds,
                       args.threads, args.prefill)
    except SfedgeError as exc:
        print(f"decode_context: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print("| round | position | method | tokens | median ms | min ms | CPU ms (median) | tok/s (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        rate = row["tokens"] / row["median_ms"] * 1e3
        print(f"| {row['round']} | {row['position']:,} | {row['method']} | {row['tokens']} | {row['median_ms']:.1f} | "
              f"{row['min_ms']:.1f} | {row['cpu_ms']:.1f} | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
