"""The backend parts of op_profile: ExecuTorch .pte through ETDump + executorch.devtools.Inspector, ONNX Runtime
.onnx through SessionOptions.enable_profiling (a chrome-trace JSON of node kernel times)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import List

from sfedge.benchmarks.op_profile import INSIDE, OUTSIDE, PROFILERS, Case, CaseProfile, rows_from_events
from sfedge.errors import SfedgeError

def _artifact(folder: Path, file: str) -> Path:
    """The manifest's file inside the folder (main's sfedge.manifest.artifact_path refuses paths that escape it)."""
    try:
        from sfedge.manifest import artifact_path
    except ImportError:  # a tree without the containment check
        return folder / file
    return artifact_path(folder, file)


ET_WRAPPERS = {"DELEGATE_CALL", "OPERATOR_CALL", "Method::execute"}  # spans that contain the op events
ET_LOAD_PREFIXES = ("Program::", "Method::")  # load_method / init: not part of a call


def _etdump_events(path: Path, method: str, inputs: tuple, runs: int, scratch: Path) -> tuple:
    """((op, where, ms) of the last run, Method::execute ms of the last run)."""
    try:
        from executorch.devtools import Inspector
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
    except ModuleNotFoundError as exc:
        raise SfedgeError(f"profiling .pte files needs {exc.name}: pip install 'sfedge[executorch]'") from None
    module = _load_for_executorch(str(path), enable_etdump=True, debug_buffer_size=0)
    for _ in range(runs):
        module.run_method(method, inputs)
    etdump = scratch / f"{path.stem}.etdp"
    module.write_etdump_result_to_file(str(etdump))
    events, total = [], 0.0
    for block in Inspector(etdump_path=str(etdump)).event_blocks:
        for event in block.events:
            if not event.perf_data or not event.perf_data.raw:
                continue
            ms = float(event.perf_data.raw[-1])
            if event.name == "Method::execute":
                total += ms
            elif event.name not in ET_WRAPPERS and not event.name.startswith(ET_LOAD_PREFIXES):
                events.append((event.name, INSIDE if event.is_delegated_op else OUTSIDE, ms))
    return events, total


def profile_executorch(folder: Path, cases: List[Case], runs: int, threads: int = 0) -> List[CaseProfile]:
    import torch

    from sfedge.manifest import read_manifest
    from sfedge.runtime.sessions.executorch import _load_kernels

    _load_kernels(read_manifest(folder))  # llama.custom_sdpa / update_cache, quantized embeddings
    if threads:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)

    profiles = []
    with tempfile.TemporaryDirectory(prefix="sfedge_etdump_") as scratch:
        for case in cases:
            inputs = tuple(torch.from_numpy(value) for value in case.feeds.values())
            events, total = _etdump_events(_artifact(folder, case.entry.file), case.entry.method, inputs, runs, Path(scratch))
            rows, by_where = rows_from_events(events, total)
            profiles.append(CaseProfile(case.entry.component, case.label, case.entry.file, round(total, 3), by_where, rows))
    return profiles


def _ort_trace(path: Path, feeds: dict, runs: int, threads: int, scratch: Path) -> list:
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise SfedgeError("profiling .onnx files needs onnxruntime: pip install 'sfedge[onnx]'") from None
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(scratch / path.stem)
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    for _ in range(runs):
        session.run(None, {name: value for name, value in feeds.items() if name in wanted})
    return json.loads(Path(session.end_profiling()).read_text())


def _ort_events(trace: list) -> tuple:
    """((op, provider, ms) of the last model_run, its ms)."""
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if not runs:
        raise SfedgeError("ONNX Runtime's profile has no model_run event (profiling did not record the run)")
    last = runs[-1]
    start, end = last["ts"], last["ts"] + last["dur"]
    events = [(e["args"].get("op_name", e["name"]), e["args"].get("provider", "?"), e["dur"] / 1000.0)
              for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
              and start <= e["ts"] <= end]
    return events, last["dur"] / 1000.0


def profile_onnx(folder: Path, cases: List[Case], runs: int, threads: int = 0) -> List[CaseProfile]:
    profiles = []
    with tempfile.TemporaryDirectory(prefix="sfedge_ort_profile_") as scratch:
        for case in cases:
            trace = _ort_trace(_artifact(folder, case.entry.file), case.feeds, runs, threads, Path(scratch))
            events, total = _ort_events(trace)
            rows, by_where = rows_from_events(events, total)
            profiles.append(CaseProfile(case.entry.component, case.label, case.entry.file, round(total, 3), by_where, rows))
    return profiles


PROFILERS.add("executorch", profile_executorch)
PROFILERS.add("onnx", profile_onnx)
