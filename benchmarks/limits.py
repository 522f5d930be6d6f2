"""The machine's limits, measured in the same run: memory bandwidth (STREAM-like torch copy and a
read-only reduction), fp32 matmul FLOP/s, and the fixed calibration workload the regression gate
divides every timing by."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

BANDWIDTH_MIB = 128  # well past any L3 cache on the machines we target
MATMUL_N = 1024


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        best = min(best, (time.perf_counter_ns() - start) / 1e9)
    return best


@dataclass
class Limits:
    threads: int
    copy_gb_s: float  # STREAM "copy" convention: bytes read + bytes written per second
    read_gb_s: float  # a reduction over a large tensor: bytes read per second
    matmul_gflop_s: float  # torch fp32 [n, n] @ [n, n], 2 n^3 FLOP
    matmul_n: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure_limits(repeats: int = 5) -> Limits:
    import torch

    elements = BANDWIDTH_MIB * 2**20 // 4
    src = torch.ones(elements, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    copy_s = _best_seconds(lambda: dst.copy_(src), repeats)
    read_s = _best_seconds(lambda: src.sum(), repeats)
    a = torch.randn(MATMUL_N, MATMUL_N)
    b = torch.randn(MATMUL_N, MATMUL_N)
    a @ b
    mm_s = _best_seconds(lambda: a @ b, repeats)
    nbytes = elements * 4
    return Limits(threads=torch.get_num_threads(), copy_gb_s=2 * nbytes / copy_s / 1e9, read_gb_s=nbytes / read_s / 1e9,
                  matmul_gflop_s=2 * MATMUL_N**3 / mm_s / 1e9, matmul_n=MATMUL_N)


class Calibration:
    """A fixed workload (fp32 matmuls plus a memcpy loop) whose best time tracks how fast this
    machine is right now; timings divided by it drift far less on shared CI runners."""

    def __init__(self):
        import torch

        self.torch = torch
        self.a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
        self.src = torch.ones(4 * 2**20 // 4)
        self.dst = torch.empty_like(self.src)

    def _work(self) -> None:
        x = self.a
        for _ in range(6):
            x = (x @ self.a).clamp_(-1, 1)
        for _ in range(8):
            self.dst.copy_(self.src)

    def measure_ms(self, repeats: int = 9) -> float:
        self._work()  # warm the thread pool and the caches
        self._work()
        return _best_seconds(self._work, repeats) * 1e3
