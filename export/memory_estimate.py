"""The up-front memory check of ``sfedge export``: estimate the export's peak RSS from the preset's shapes
before anything is built, and refuse (one line) an export that will not fit the memory available.

The exporters build, convert and free one part at a time (export/common.py ``model_part``), so the peak
is set by the largest part, the LLM (token embedding + decoder: its float32 weights):

    peak ~= base + factor[backend] x float32 bytes of the largest part + KV-cache bytes

``base`` is the process with torch and the backend's libraries loaded; ``factor`` is how many float32
copies of the part the backend's tools hold at their worst stage. Both come from the per-stage peaks the
manifest records for the 1B preset (docs/export_memory.md has the runs); an estimate errs high by design.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from sfedge.memory import GiB, LIMIT_ENV, Available, InsufficientMemory, available_memory, gib

OVERRIDE_FLAG = "--ignore-memory-check"


@dataclass(frozen=True)
class Footprint:
    base_bytes: int
    factor: float  # float32 copies of the largest part alive at the worst stage
    measured: str  # where the numbers come from


# Measured on sf-llava-1.5-1b (LLM 1.54 B parameters = 5.75 GiB float32), docs/export_memory.md.
FOOTPRINTS: Dict[str, Footprint] = {
    "executorch": Footprint(int(1.0 * GiB), 1.2, "1B 8da4w-flat"),
    "onnx": Footprint(int(1.0 * GiB), 1.2, "1B int4"),
    "coreml": Footprint(int(1.0 * GiB), 1.2, "1B int4"),
    "executorch-coreml": Footprint(int(1.0 * GiB), 2.0, "not measured at size: the whole model is lowered at once"),
}


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int
    largest_part: str
    part_bytes: Dict[str, int]  # float32 bytes of each part
    kv_bytes: int

    def describe(self) -> str:
        return f"~{gib(self.peak_bytes)} (largest part {self.largest_part}: {gib(self.part_bytes[self.largest_part])} float32)"


def part_bytes(model) -> Dict[str, int]:
    """Float32 bytes of each part's weights, tied tensors counted once (read from a meta model: no memory)."""
    from sfedge.models import PART_MODULES

    tied = model.text_decoder.lm_head.weight if model.config.llm.tie_embeddings else None  # stored once (the embedding)
    sizes = {}
    for part, names in PART_MODULES.items():
        unique = {id(p): p for name in names for p in getattr(model, name).parameters() if p is not tied}
        sizes[part] = sum(p.numel() for p in unique.values()) * 4
    return sizes


def kv_cache_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for name, b in model.text_decoder.named_buffers()
               if name.rsplit(".", 1)[-1] in ("k_cache", "v_cache"))


def estimate_export_peak(model, backend: str) -> MemoryEstimate:
    """``model``: the empty (meta) model the export will fill."""
    footprint = FOOTPRINTS.get(backend, max(FOOTPRINTS.values(), key=lambda f: f.factor))
    sizes = part_bytes(model)
    largest = max(sizes, key=sizes.get)
    kv = kv_cache_bytes(model)
    peak = footprint.base_bytes + int(footprint.factor * sizes[largest]) + kv
    return MemoryEstimate(peak, largest, sizes, kv)


def check_memory(estimate: MemoryEstimate, available: Available | None = None) -> Available:
    """Raise InsufficientMemory (one line) when the estimate exceeds what is available."""
    available = available or available_memory()
    if estimate.peak_bytes > available.nbytes:
        hint = f" or raise {LIMIT_ENV}" if available.source == LIMIT_ENV else ""
        raise InsufficientMemory(
            f"this export needs an estimated {estimate.describe()} but {available.describe()}: free memory, choose a "
            f"smaller --model, or pass {OVERRIDE_FLAG} to try anyway{hint}")
    return available
