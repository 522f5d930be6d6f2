"""Process memory: peak RSS per export stage, the memory this machine has available, sizes as text.

Per-stage peaks come from a background thread sampling the process RSS (every ``SAMPLE_SECONDS``),
corrected with the kernel's exact high-water mark: when VmHWM grew during a stage, the process peak
was reached inside it and the stage peak is VmHWM itself. The high-water mark is never reset:
writing ``5`` to /proc/self/clear_refs would reset it per stage, but the kernel reports the same
counter to the parent at exit (wait4's ru_maxrss, what ``/usr/bin/time -v`` prints as "Maximum
resident set size"), so a reset would falsify the process peak everyone else measures.
"""
from __future__ import annotations

import os
import re
import resource
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sfedge.errors import SfedgeError, UsageError

GiB = 1024 ** 3
SAMPLE_SECONDS = 0.02
TREE_MARGIN = 16 * 1024 ** 2  # a sampled process-tree sum counts over a stage's own peak only above this (page noise)
LIMIT_ENV = "SFEDGE_MEMORY_LIMIT"  # e.g. "12GiB": the memory the up-front check assumes is available
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000 ** 2, "mb": 1000 ** 2, "mib": 1024 ** 2,
          "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3, "t": 1000 ** 4, "tb": 1000 ** 4, "tib": 1024 ** 4}
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_size(text: str, what: str = LIMIT_ENV) -> int:
    """``"1MiB"``, ``"12GiB"``, ``"1.5GB"``, ``"4096"`` -> bytes; anything else is a one-line UsageError."""
    match = _SIZE.match(str(text))
    unit = match.group("unit").lower() if match else ""
    if not match or unit not in _UNITS:
        raise UsageError(f"{what}={text!r} is not a size: write a number with an optional unit such as 512MiB, 12GiB or 16GB")
    return int(float(match.group("number")) * _UNITS[unit])


def gib(nbytes: Optional[float]) -> str:
    return "-" if nbytes is None else f"{nbytes / GiB:.2f} GiB"


# --- what the process uses -------------------------------------------------------------------------

def _proc_kib(path: str, field: str) -> Optional[int]:
    """Bytes of a ``Field:  N kB`` line of a /proc file (/proc/self/status, /proc/meminfo); None if absent."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _status_kib(field: str) -> Optional[int]:
    return _proc_kib("/proc/self/status", field)


def current_rss() -> int:
    """Resident bytes of this process now."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import psutil

    return psutil.Process().memory_info().rss


def rss_with(pids) -> int:
    """Resident bytes of this process plus those of the given child processes (an export that runs a part in a
    second process: what the machine must hold). Only named processes count: a short-lived fork+exec (a tool
    run by a library) shares the parent's pages, and its RSS would count them twice."""
    total = current_rss()
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue  # ended, or no /proc
    return total


def peak_rss() -> int:
    """The process's peak resident bytes so far (VmHWM; ru_maxrss elsewhere: bytes on macOS, KiB on Linux)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


class RssSampler:
    """A daemon thread that keeps the highest RSS seen since the last ``reset()``: this process's, and that of
    this process with the ``child_pids`` beside it (``tree_high``; ``tree_peak`` is never reset)."""

    def __init__(self, interval: float = SAMPLE_SECONDS):
        self.interval = interval
        self._high = 0
        self._tree_high = 0
        self.tree_peak = 0
        self.child_pids: tuple = ()  # child processes working beside this one: their RSS is sampled too
        self._epoch = 0  # bumped by reset(): a reading taken before a reset is not counted after it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "RssSampler":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sfedge-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            epoch = self._epoch
            pids = self.child_pids
            self._observe(current_rss(), epoch, rss_with(pids) if pids else 0)

    def _observe(self, rss: int, epoch: int, tree: int = 0) -> None:
        with self._lock:
            self.tree_peak = max(self.tree_peak, tree)
            if epoch == self._epoch:
                self._high = max(self._high, rss)
                self._tree_high = max(self._tree_high, tree)

    def reset(self) -> None:
        with self._lock:
            self._epoch += 1
            self._high = current_rss()
            self._tree_high = 0

    def high(self) -> int:
        epoch = self._epoch
        self._observe(current_rss(), epoch)
        with self._lock:
            return self._high

    def tree_high(self) -> int:
        """The highest RSS of this process and its children since the last ``reset()`` (0: none sampled)."""
        with self._lock:
            return self._tree_high


@dataclass(frozen=True)
class StagePeak:
    """What one stage used: its peak resident bytes, and whether that is the process's peak so far."""

    peak_bytes: int
    process_peak: bool


class StageMeter:
    """``begin()`` ... ``end()`` around a stage gives its peak RSS (sampled, corrected with VmHWM)."""

    def __init__(self, sampler: RssSampler):
        self.sampler = sampler
        self._hwm_before = 0

    def begin(self) -> None:
        self._hwm_before = peak_rss()
        self.sampler.reset()

    def end(self) -> StagePeak:
        hwm = peak_rss()
        # a VmRSS reading can run a page or so above VmHWM (the kernel folds per-thread RSS counters into the
        # high-water mark lazily): no stage peak is above the process's
        sampled = min(self.sampler.high(), hwm)
        own = StagePeak(hwm, True) if hwm > self._hwm_before else StagePeak(sampled, False)
        # with a part exported in a child process beside this one, the stage holds both: the sampled sum, if higher
        tree = self.sampler.tree_high()
        return StagePeak(tree, own.process_peak) if tree > own.peak_bytes + TREE_MARGIN else own


def release_free_heap() -> bool:
    """Give the pages malloc holds free back to the OS (glibc ``malloc_trim(0)``: whole free pages anywhere in
    the heap, not only at its top); False where there is no glibc. After a large load that freed most of
    what it allocated (ONNX Runtime's model protos and pre-packing copies) this makes the resident set what
    is live, not what the allocator happened to keep: ~400 MB that otherwise varied from process to process."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


# --- what the machine has ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Available:
    nbytes: int
    source: str  # "MemAvailable", "cgroup memory.max", "SFEDGE_MEMORY_LIMIT"

    def describe(self) -> str:
        return f"{gib(self.nbytes)} available ({self.source})"


def _meminfo_available() -> Optional[int]:
    return _proc_kib("/proc/meminfo", "MemAvailable")


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """limit - usage of this process's memory cgroup, if a limit is set (v2 memory.max, v1 limit_in_bytes)."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is not None and limit < 2 ** 60:  # v1's "no limit" is a huge number
            return max(0, limit - (usage or 0))
    return None


def available_memory() -> Available:
    """What an export may use: ``SFEDGE_MEMORY_LIMIT`` if set, else the smaller of MemAvailable and the cgroup's headroom."""
    override = os.environ.get(LIMIT_ENV)
    if override:
        return Available(parse_size(override), LIMIT_ENV)
    found = [Available(n, source) for n, source in ((_meminfo_available(), "MemAvailable"),
                                                    (_cgroup_headroom(), "cgroup memory limit")) if n is not None]
    if not found:
        import psutil

        return Available(psutil.virtual_memory().available, "psutil available")
    return min(found, key=lambda a: a.nbytes)


class InsufficientMemory(SfedgeError):
    """The export's estimated peak does not fit the memory available (exit 1)."""
