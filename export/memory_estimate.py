"""The up-front memory check of ``sfedge export``: estimate the export's peak RSS from the preset's shapes
before anything is built, and refuse (one line) an export that will not fit the memory available.

The part-by-part exporters (export/common.py ``model_part``) hold one part's weights at a time, so the
peak is set by the largest part (the LLM: token embedding + decoder) at one of two kinds of stage:

    peak ~= base + KV cache + max(part_factor x P,  tensor_factor x T + quantized_fraction x P)

P = float32 bytes of the largest part, T = float32 bytes of its largest single tensor (the 151,936-row
token table / lm_head). ``part_factor``: float32 copies of the whole part alive at once (ONNX tracing holds
the torch weights; Core ML converting holds them plus the MIL program's). ``tensor_factor``: copies of the
largest tensor a quantizer holds while it quantizes it (HQQ in torchao, MatMulNBits, coremltools), with
``quantized_fraction`` of the part already quantized beside it. An exporter that builds the whole model
(executorch-coreml) has P = every part. The factors are measured per stage (the manifest's records) on the
1B's LLM shape with 2 of its 28 layers (docs/export_memory.md) and rounded up: the estimate errs high.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from sfedge.memory import GiB, LIMIT_ENV, Available, InsufficientMemory, available_memory, gib

OVERRIDE_FLAG = "--ignore-memory-check"
COREML_LLM_IN_TORCH = "coreml, LLM quantized in torch"
ONNX_LLM_STAND_INS = "onnx, LLM traced from stand-ins"


@dataclass(frozen=True)
class Footprint:
    base_bytes: int  # the process with torch and the backend's libraries loaded
    part_factor: float
    tensor_factor: float
    quantized_fraction: float
    measured: str  # where the numbers come from


# docs/export_memory.md, "Where the peaks come from": stage peaks of the 2-layer 1B-shape probes.
FOOTPRINTS: Dict[str, Footprint] = {
    # the vision encoder and projector (traced with their float32 weights): the vision encoder's int8
    # quantize_dynamic (ORT) at 1B: 5.51 GiB = 0.6 + 3.06 x its 1.61 GiB
    # (5.72 GiB in the 14:36 1B export: part_factor 3.2)
    "onnx": Footprint(int(0.6 * GiB), 3.2, 2.8, 0.15, "1B export, int4 (vision encoder quantize)"),
    # the LLM traced from stand-ins (export/onnx_weights.py): no float32 copy of the part is held; the costliest
    # stages hold the token table: its int4 Gather quantize 2.83 GiB = 0.5 + 2.7 x 0.87 GiB (2-layer probe), the
    # decoder trace writing the transposed lm_head 2.23 GiB (table + its transposed copy), the decoder's int4
    # quantize (MatMul weights memory-mapped, int4 results accumulating) 1.83 GiB. At 3B the int4 decoder's
    # serialize sets the export's peak: 6.46 GiB = 0.6 + 0.14 KV + 0.5 x 11.5 GiB (part_factor 0.5)
    ONNX_LLM_STAND_INS: Footprint(int(0.6 * GiB), 0.5, 2.8, 0.15, "2-layer probe and 3B export, int4, LLM from stand-ins"),
    # lm_head 8da4w quantize 4.71 GiB = 0.5 + 4.5 x 0.87 GiB + the quantized layers
    # the 1B 8da4w export (7.83 GiB at the lm_head's HQQ quantize, ~2.1 GiB left resident by the vision lowering)
    "executorch": Footprint(int(0.6 * GiB), 0.3, 4.8, 0.52, "2-layer probe, 8da4w-flat; 1B 8da4w export"),
    # llm.decode convert 4.33 GiB = 0.5 + 3.1 x 1.22 GiB (torch float32 + MIL program + what earlier functions left)
    "coreml": Footprint(int(0.6 * GiB), 3.2, 3.5, 0.2, "2-layer probe, int4"),
    # int4 / int8 recipes: the LLM quantized in torch layer by layer and converted with its int4 weights
    # (quantize/coreml_torch.py). The peak is save_multifunction (all three functions' weights loaded back):
    # 2-layer probe 1.90 GiB (its torch weights released before the merge). Refit to the full-size exports
    # (2026-11-30): 1B 4.97 GiB = 0.6 + 0.11 KV + 0.3 x 0.87 T + 0.70 x 5.75 P; 3B 9.03 GiB = 0.6 + 0.14 + 0.3 x 1.16
    # + 0.69 x 11.5 (was 1.05: the 3B estimated 13.2 GiB); rounded up to 0.75
    COREML_LLM_IN_TORCH: Footprint(int(0.6 * GiB), 0.0, 0.3, 0.75, "1B and 3B exports, int4 quantized in torch"),
    # builds the whole model and lowers every method at once: Core ML's factor over all parts
    "executorch-coreml": Footprint(int(0.6 * GiB), 3.2, 3.5, 0.2, "Core ML's factors, whole model"),
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


def largest_tensor_bytes(model, part: str | None = None) -> int:
    """Float32 bytes of the largest tensor of ``part`` (or of the whole model)."""
    from sfedge.models import PART_MODULES

    modules = [getattr(model, name) for name in PART_MODULES[part]] if part else [model]
    return max((p.numel() * 4 for module in modules for p in module.parameters()), default=0)


def footprint_for(backend: str, part: str, recipe: str | None = None) -> Footprint:
    """The factors of ``part``'s stages: Core ML's LLM quantized in torch before conversion and ONNX's LLM traced
    from stand-ins have their own."""
    if backend == "onnx" and part == "llm":
        return FOOTPRINTS[ONNX_LLM_STAND_INS]
    if backend == "coreml" and part == "llm" and recipe:
        from sfedge.quantize.coreml_torch import llm_quantized_in_torch
        from sfedge.quantize.recipes import get_recipe

        if llm_quantized_in_torch(get_recipe(backend, recipe)):
            return FOOTPRINTS[COREML_LLM_IN_TORCH]
    return FOOTPRINTS.get(backend, FOOTPRINTS["coreml"])


def _stage_bytes(footprint: Footprint, held: int, largest_tensor: int) -> float:
    return max(footprint.part_factor * held, footprint.tensor_factor * largest_tensor + footprint.quantized_fraction * held)


def estimate_export_peak(model, backend: str, recipe: str | None = None) -> MemoryEstimate:
    """``model``: the empty (meta) model the export will fill; ``recipe``: the --quant name (it picks the factors
    where a backend's recipes take different routes)."""
    from sfedge.export.api import PART_BY_PART

    sizes = part_bytes(model)
    largest = max(sizes, key=sizes.get)
    kv = kv_cache_bytes(model)
    if backend in PART_BY_PART:  # one part held at a time: the costliest part's stage sets the peak
        stage = max(_stage_bytes(footprint_for(backend, part, recipe), sizes[part], largest_tensor_bytes(model, part))
                    for part in sizes)
    else:
        stage = _stage_bytes(FOOTPRINTS.get(backend, FOOTPRINTS["coreml"]), sum(sizes.values()), largest_tensor_bytes(model))
    return MemoryEstimate(int(FOOTPRINTS.get(backend, FOOTPRINTS["coreml"]).base_bytes + kv + stage), largest, sizes, kv)


def side_by_side_peak(model, backend: str, recipe: str | None, child_parts) -> int:
    """The estimated peak when ``child_parts`` are exported in a second process beside the rest: the usual
    estimate plus, for the child, a base and the costliest of its parts' stages (both peaks summed: conservative,
    the child usually ends before the LLM's lowering peaks)."""
    footprint = FOOTPRINTS.get(backend, FOOTPRINTS["coreml"])
    sizes = part_bytes(model)
    child = max(_stage_bytes(footprint_for(backend, part, recipe), sizes[part], largest_tensor_bytes(model, part))
                for part in child_parts)
    return estimate_export_peak(model, backend, recipe).peak_bytes + int(footprint.base_bytes + child)


def check_memory(estimate: MemoryEstimate, available: Available | None = None) -> Available:
    """Raise InsufficientMemory (one line) when the estimate exceeds what is available."""
    available = available or available_memory()
    if estimate.peak_bytes > available.nbytes:
        hint = f" or raise {LIMIT_ENV}" if available.source == LIMIT_ENV else ""
        raise InsufficientMemory(
            f"this export needs an estimated {estimate.describe()} but {available.describe()}: free memory, choose a "
            f"smaller --model, or pass {OVERRIDE_FLAG} to try anyway{hint}")
    return available
