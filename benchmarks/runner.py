"""Run a sweep: one fresh worker process per case (so cases cannot pollute each other's memory or
warm caches), the machine's limits per thread count, provenance on every row, roofline shares."""
from __future__ import annotations

import collections
import datetime
import json
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

from sfedge.benchmarks.cases import BenchCase, Sweep
from sfedge.benchmarks.provenance import provenance
from sfedge.benchmarks.roofline import shares
from sfedge.errors import SfedgeError

SCHEMA = "sfedge-bench/1"
WORKER_MODULE = "sfedge.benchmarks.worker"


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def spawn_worker(job: dict, progress: Callable[[str], None] = _progress, timeout_s: Optional[float] = None,
                 module: str = WORKER_MODULE) -> dict:
    """Run one job in ``python -m sfedge.benchmarks.worker`` (or ``module``); its stderr is forwarded line
    by line, its stdout is one JSON result. A crash becomes {"status": "failed", "note": <last stderr lines>}."""
    process = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    output: List[str] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()
    process.stdin.write(json.dumps(job))
    process.stdin.close()
    tail: collections.deque = collections.deque(maxlen=12)
    for line in process.stderr:
        line = line.rstrip("\n")
        tail.append(line)
        progress(line)
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return {"status": "failed", "note": f"worker timed out after {timeout_s:.0f} s"}
    reader.join()
    text = "".join(output).strip()
    try:
        result = json.loads(text.splitlines()[-1]) if text else None
    except ValueError:
        result = None
    if isinstance(result, dict) and (code == 0 or result.get("status") == "failed"):
        return result
    detail = " | ".join(line for line in tail if line.strip())[-600:]
    return {"status": "failed", "returncode": code, "note": f"worker exited with code {code}: {detail or 'no output'}"}


def measure_limits(threads: Optional[int], progress: Callable[[str], None] = _progress) -> dict:
    result = spawn_worker({"kind": "limits", "threads": threads}, progress)
    if result.get("status") == "failed":
        raise SfedgeError(f"measuring the machine's limits failed: {result['note']}")
    return result


def attach_roofline(record: dict, limits: Dict[str, dict]) -> None:
    limit = limits.get(str(record.get("threads")))
    metrics = record.get("metrics", {})
    if not limit or "work" not in record or not metrics:
        return
    mean = lambda name: metrics.get(name, {}).get("mean", 0.0)  # noqa: E731
    record["limits"] = limit
    record["roofline"] = shares(record["work"], limit, mean("decode_tokens_per_s"), mean("prefill_ms"),
                                mean("vision_encode_ms"))


def run_sweep(sweep: Sweep, with_limits: bool = True, progress: Callable[[str], None] = _progress,
              executor=None) -> dict:
    """``executor``: where cases run (default: fresh local subprocesses); anything with
    ``measure_limits(threads, progress)`` and ``run_case(case, progress)``, e.g. benchmarks/ray_runner.py."""
    executor = executor or LOCAL
    cases = sweep.expand()
    for note in sweep.notes:
        progress(f"note: {note}")
    if not cases:
        raise SfedgeError("the sweep has no cases to run")
    prov = provenance()
    limits: Dict[str, dict] = {}
    if with_limits:
        for threads in dict.fromkeys(case.threads for case in cases):
            progress(f"limits (threads {threads or 'default'}): memory bandwidth and fp32 matmul ...")
            result = executor.measure_limits(threads, progress)
            limits[str(threads)] = result
            limits[str(result["threads"])] = result
            progress(f"  read {result['read_gb_s']:.1f} GB/s, copy {result['copy_gb_s']:.1f} GB/s, "
                     f"matmul {result['matmul_gflop_s']:.0f} GFLOP/s ({result['threads']} thread(s))")
    records = []
    for index, case in enumerate(cases, 1):
        progress(f"[{index}/{len(cases)}] {case.key}: warm-up {case.warmup} + {case.repetitions} repetitions")
        start = time.perf_counter()
        record = executor.run_case(case, progress)
        record["provenance"] = {**prov, "threads": record.get("threads", case.threads)}
        if record["status"] == "ok":
            attach_roofline(record, limits)
            ttft = record["metrics"]["ttft_ms"]["mean"]
            decode = record["metrics"]["decode_tokens_per_s"]["mean"]
            progress(f"  done in {time.perf_counter() - start:.1f} s: TTFT {ttft:.1f} ms, decode {decode:.1f} tok/s, "
                     f"peak RSS {record['peak_rss_bytes'] / 2**20:.0f} MiB")
        else:
            progress(f"  FAILED: {record['note']}")
        records.append(record)
    return {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "provenance": prov, "limits": limits, "notes": list(sweep.notes), "results": records}


def run_case(case: BenchCase, progress: Callable[[str], None] = _progress) -> dict:
    result = spawn_worker({"kind": "case", "case": case.to_dict()}, progress)
    if result.get("status") == "failed":
        return {"key": case.key, "name": case.name, "source": case.source.label, "status": "failed",
                "note": result.get("note", ""), "case": case.to_dict()}
    return result


class LocalExecutor:
    """Each case and each limits measurement in a fresh subprocess on this machine."""

    measure_limits = staticmethod(measure_limits)
    run_case = staticmethod(run_case)


LOCAL = LocalExecutor()


def load_document(path: str) -> dict:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except OSError as exc:
        raise SfedgeError(f"cannot read benchmark results {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SfedgeError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise SfedgeError(f"{path} is not an sfedge benchmark file (expected schema {SCHEMA!r}); "
                          "write one with `sfedge bench ... --output json --out FILE` or --save-baseline FILE")
    return data
