"""The machine's limits, measured in the same run: memory bandwidth (STREAM-like torch copy and a
read-only reduction over a buffer sized past the last-level cache), fp32 matmul FLOP/s, and the
fixed calibration workload the regression gate divides every timing by."""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

CPU_CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"
LLC_MULTIPLE = 4  # the probe buffer is this many times the last-level cache ...
MIN_PROBE_BYTES = 512 * 2**20  # ... and at least this (also the size when sysfs says nothing) ...
MAX_PROBE_BYTES = 2 * 2**30  # ... and at most this (copy needs two buffers; keep the probe quick)
MATMUL_N = 1024
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_cache_size(text: str) -> Optional[int]:
    """sysfs cache sizes: '48K', '2048K', '307200K', '32M' -> bytes (None when unreadable)."""
    match = _SIZE.match(text)
    return int(match.group(1)) * _UNITS[match.group(2).upper()] if match else None


def last_level_cache_bytes(cache_dir: str = CPU_CACHE_DIR) -> Optional[int]:
    """Size of the highest-level data or unified cache of cpu0 from sysfs (index*/level, type, size);
    None where sysfs has no cache description (macOS, some containers)."""
    best: Optional[tuple] = None
    for index in sorted(Path(cache_dir).glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = parse_cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and size and (best is None or (level, size) > best):
            best = (level, size)
    return best[1] if best else None


def bandwidth_probe_bytes(llc_bytes: Optional[int]) -> int:
    """Buffer size for the bandwidth probe: LLC_MULTIPLE x the last-level cache, so the stream
    comes from DRAM, clamped to [MIN_PROBE_BYTES, MAX_PROBE_BYTES] and rounded to whole MiB."""
    wanted = LLC_MULTIPLE * llc_bytes if llc_bytes else MIN_PROBE_BYTES
    return min(max(wanted, MIN_PROBE_BYTES), MAX_PROBE_BYTES) // 2**20 * 2**20


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
    probe_bytes: int = 0  # the bandwidth probe's buffer size (copy uses two of them)
    llc_bytes: Optional[int] = None  # the last-level cache it was sized against (None: unknown)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_limits(repeats: int = 5, cache_dir: str = CPU_CACHE_DIR) -> Limits:
    import torch

    llc = last_level_cache_bytes(cache_dir)
    elements = bandwidth_probe_bytes(llc) // 4
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
                  matmul_gflop_s=2 * MATMUL_N**3 / mm_s / 1e9, matmul_n=MATMUL_N, probe_bytes=nbytes, llc_bytes=llc)


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
