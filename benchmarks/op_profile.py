"""Per-operator time of each component of an artifact folder: ExecuTorch (ETDump + Inspector) and ONNX Runtime
(its JSON profiler). The command is ``sfedge profile DIR`` (sfedge/cli/profile.py).

Cases: the vision encoder on one batch, the default projector, the text decoder on one prefill chunk (from
position 0) and one decode step at each of ``positions`` (clipped to the export's context; the KV cache holds
zeros, which costs the same as real keys). Each case runs ``runs`` times in one session; the last run is
reported (the earlier ones warm up caches and the allocator). Inputs come from the manifest's tensor specs with the symbolic dims
resolved per case. The backend parts live in op_profile_backends.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np

from sfedge.errors import SfedgeError
from sfedge.manifest import ArtifactEntry, Component, Manifest, TensorSpec, read_manifest
from sfedge.registry import Registry

DEFAULT_POSITIONS = (100, 1500, 5800)
INSIDE, OUTSIDE = "delegate", "portable"  # ExecuTorch: inside the XNNPACK delegate or a portable kernel


@dataclass(frozen=True)
class OpRow:
    op: str
    calls: int
    total_ms: float
    share: float  # of the case's total
    where: str  # ExecuTorch: delegate / portable; ONNX Runtime: the execution provider


@dataclass(frozen=True)
class CaseProfile:
    component: str
    case: str  # e.g. "batch 2", "prefill 128 @0", "decode @1500"
    file: str
    total_ms: float  # the whole call (Method::execute / model_run)
    by_where: Dict[str, float]  # where -> ms summed over its ops
    ops: List[OpRow] = field(default_factory=list)  # every op, slowest first

    def top(self, count: int) -> List[OpRow]:
        return self.ops[:count]


@dataclass(frozen=True)
class Case:
    """One call to profile: the artifact, its method, the concrete inputs."""

    entry: ArtifactEntry
    label: str
    feeds: Dict[str, np.ndarray]


def op_kind(name: str) -> str:
    """'Fully Connected (NC, QDU8, F32, QC8W) GEMM #12' -> without the ' #12'; 'native_call_where.self_out' -> 'where.self_out'."""
    return re.sub(r" #\d+$", "", name).removeprefix("native_call_")


def rows_from_events(events: Sequence[tuple], total_ms: float) -> tuple:
    """(op, where, ms) per call -> (rows slowest first, where -> ms)."""
    calls: Dict[tuple, list] = {}
    for op, where, ms in events:
        calls.setdefault((op_kind(op), where), []).append(ms)
    rows = [OpRow(op, len(times), round(sum(times), 3), round(sum(times) / total_ms, 4) if total_ms else 0.0, where)
            for (op, where), times in calls.items()]
    rows.sort(key=lambda row: -row.total_ms)
    by_where: Dict[str, float] = {}
    for row in rows:
        by_where[row.where] = round(by_where.get(row.where, 0.0) + row.total_ms, 3)
    return rows, by_where


# --- inputs --------------------------------------------------------------------------------------------------

_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def _shape(spec: TensorSpec, dims: Dict[str, int], where: str) -> List[int]:
    shape = []
    for dim in spec.shape:
        if isinstance(dim, str):
            if dim not in dims:
                raise SfedgeError(f"{where}: input {spec.name} has a symbolic dim {dim!r} the profiler cannot size "
                                  f"(known: {', '.join(sorted(dims))})")
            dim = dims[dim]
        shape.append(int(dim))
    return shape


def _value(spec: TensorSpec, shape: List[int], position: int, rng: np.random.Generator) -> np.ndarray:
    dtype = _NUMPY.get(spec.dtype, np.float32)
    if spec.name in ("input_pos", "cache_position"):
        return np.full(shape, position, dtype)
    if spec.name == "position_ids":
        return np.broadcast_to(np.arange(position, position + shape[-1], dtype=dtype), shape).copy()
    if spec.name == "attention_mask":
        return np.ones(shape, dtype)
    if np.issubdtype(dtype, np.integer):
        return np.zeros(shape, dtype)
    return rng.standard_normal(shape).astype(dtype) * (0.0 if spec.name.startswith("past") else 1.0)


def feeds_for(entry: ArtifactEntry, tokens: int, position: int, batch: int, seed: int = 0,
              max_context: int = 0) -> Dict[str, np.ndarray]:
    """Concrete inputs for ``entry``: ``tokens`` new tokens at cache position ``position``, ``batch`` frames
    (``max_context``: the length of an in-place KV buffer, ONNX's GroupQueryAttention layout)."""
    dims = {"tokens": tokens, "sequence_length": tokens, "past_sequence_length": position,
            "total_sequence_length": position + tokens, "batch_size": batch, "batch": batch,
            **({"max_sequence_length": max_context} if max_context else {})}
    rng = np.random.default_rng(seed)
    return {spec.name: _value(spec, _shape(spec, dims, entry.file), position, rng) for spec in entry.inputs}


def cases(manifest: Manifest, positions: Sequence[int]) -> List[Case]:
    """The profiled calls of a folder: vision (one batch), default projector, prefill chunk, decode steps."""
    options = manifest.export_options
    batch = int(options.get("encoder_batch", 1))
    max_context = int(options.get("max_context", 0))
    chunk = int(options.get("prefill_chunk", 1))
    vision = manifest.component(Component.VISION_ENCODER)
    projector = manifest.components_of(Component.PROJECTOR)[0]
    decoder = manifest.component(Component.TEXT_DECODER)
    chunk = min(chunk, max_context - 1) if max_context else chunk
    found = [Case(vision, f"batch {batch}", feeds_for(vision, 1, 0, batch)),
             Case(projector, f"{projector.extra.get('frames', '?')} frames", feeds_for(projector, 1, 0, batch)),
             Case(decoder, f"prefill {chunk} @0", feeds_for(decoder, chunk, 0, 1, max_context=max_context))]
    for position in dict.fromkeys(min(p, max_context - 1) if max_context else p for p in positions):
        found.append(Case(decoder, f"decode @{position}", feeds_for(decoder, 1, position, 1, max_context=max_context)))
    return found


# --- backends ------------------------------------------------------------------------------------------------

Profiler = Callable[[Path, List[Case], int, int], List[CaseProfile]]  # (folder, cases, runs, threads)
PROFILERS: Registry[Profiler] = Registry("profiled backend")


def profile_folder(folder: Path, positions: Sequence[int] = DEFAULT_POSITIONS, runs: int = 2,
                   threads: int = 0) -> List[CaseProfile]:
    """Every case of the folder's manifest; ``threads`` 0 = the runtime's default."""
    from sfedge.benchmarks import op_profile_backends  # noqa: F401  (registers the backends)

    manifest = read_manifest(folder)
    return PROFILERS.get(manifest.backend)(Path(folder), cases(manifest, positions), runs, threads)


# --- output --------------------------------------------------------------------------------------------------

def table(profiles: Sequence[CaseProfile], top: int = 12) -> str:
    lines = []
    for p in profiles:
        split = ", ".join(f"{where} {ms:.1f} ms" for where, ms in p.by_where.items())
        lines += ["", f"## {p.component} [{p.case}] ({p.file}): {p.total_ms:.1f} ms; {split}",
                  f"{'op':<52} {'calls':>6} {'total ms':>10} {'share':>7}  where"]
        for row in p.top(top):
            lines.append(f"{row.op[:52]:<52} {row.calls:>6} {row.total_ms:>10.2f} {row.share:>7.1%}  {row.where}")
    return "\n".join(lines).lstrip("\n")


def to_json(profiles: Sequence[CaseProfile], top: int | None = None) -> str:
    rows = []
    for p in profiles:
        data = asdict(p)
        data["ops"] = data["ops"][:top] if top else data["ops"]
        rows.append(data)
    return json.dumps(rows, indent=1)
