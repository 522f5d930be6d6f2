"""torch module -> Core ML mlprogram through torch.export (the only route that converts sfedge's
stateful LLM with coremltools 9.0), plus reading back what a saved package declares."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sfedge.errors import UsageError
from sfedge.manifest import TensorSpec


def coremltools():
    """Import coremltools quietly (it logs which native proxies it cannot load on Linux)."""
    try:
        with _quiet():
            import coremltools as ct
    except ModuleNotFoundError as exc:
        raise UsageError(f"the Core ML exporter needs {exc.name}: pip install 'sfedge[coreml]'") from None
    return ct


@contextlib.contextmanager
def _quiet():
    loggers = [logging.getLogger(name) for name in ("coremltools", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@dataclass(frozen=True)
class Port:
    """A named input or output with a static shape; float ports are fp16 at the package boundary."""

    name: str
    shape: tuple
    dtype: str  # "float16" | "int32"

    def example(self) -> torch.Tensor:
        if self.dtype == "int32":
            return torch.zeros(self.shape, dtype=torch.int32)
        return torch.randn(self.shape, dtype=torch.float32)

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, list(self.shape), self.dtype)


def strip_aliases(program: torch.export.ExportedProgram) -> int:
    """coremltools 9.0 has no translation for ``aten.alias``; it is a no-op, so drop it."""
    graph = program.graph
    removed = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in (torch.ops.aten.alias.default, torch.ops.aten.alias_copy.default):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    if removed:
        graph.eliminate_dead_code()
        program.graph_module.recompile()
    return removed


def export_program(module: torch.nn.Module, inputs: Sequence[Port]) -> torch.export.ExportedProgram:
    with torch.no_grad():
        program = torch.export.export(module.eval(), tuple(p.example() for p in inputs), strict=False)
        program = program.run_decompositions({})
    strip_aliases(program)
    return program


def convert(program: torch.export.ExportedProgram, inputs: Sequence[Port], outputs: Sequence[Port], target: str):
    """ExportedProgram -> MLModel (mlprogram, fp16 compute, static shapes). Mutable buffers become fp16 states."""
    ct = coremltools()
    dtypes = {"float16": np.float16, "int32": np.int32}
    with _quiet(), frugal_fp16_overflow_check():
        return ct.convert(
            program,
            inputs=[ct.TensorType(name=p.name, shape=p.shape, dtype=dtypes[p.dtype]) for p in inputs],
            outputs=[ct.TensorType(name=p.name, dtype=dtypes[p.dtype]) for p in outputs],
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=ct.precision.FLOAT16,
            convert_to="mlprogram",
            skip_model_load=True,  # Linux cannot load a Core ML model; macOS loads it on first use
        )


OVERFLOW_CHUNK = 1 << 24  # elements per slice of the fp16 overflow check


def _fits_fp16(value: np.ndarray) -> bool:
    """False when a finite-ish entry (|v| < 1e38) exceeds float16's 65504: coremltools' test, one slice at a time."""
    flat = value.reshape(-1)
    for start in range(0, flat.size, OVERFLOW_CHUNK):
        magnitude = np.abs(flat[start:start + OVERFLOW_CHUNK])
        if np.max(magnitude, where=magnitude < 1e38, initial=0.0) > 65504:
            return False
    return True


@contextlib.contextmanager
def frugal_fp16_overflow_check():
    """coremltools 9.0's ``add_fp16_cast`` pass asks, for every float32 const, whether it overflows float16 with
    ``np.abs(v)[np.where(np.abs(v) < 1e38)]``: np.where's int64 index arrays make that ~8x the const's bytes at
    once (7 GiB for the 1B's 151,936 x 1,536 lm_head). Within the block the same test runs slice by slice
    (same answer, one slice of temporaries)."""
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    original = FP16ComputePrecision.__dict__["fp16_overflow"]  # the raw descriptor (a staticmethod), restored as is

    def fp16_overflow(op) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
                if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                    if not _fits_fp16(np.asarray(var.op.val.val)):
                        return True
        return False

    FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)
    try:
        yield
    finally:
        FP16ComputePrecision.fp16_overflow = original


@contextlib.contextmanager
def frugal_allclose():
    """``save_multifunction`` deduplicates weights across functions by comparing candidates with ``np.allclose``,
    which works in float64 over the whole array: for the 1B's tied 151,936 x 1,536 int4 table (stored once for
    ``embed``, ``prefill`` and ``decode``) that is several 1.9 GB temporaries at once. Within the block two
    arrays of one shape are compared slice by slice (the same answer: allclose is elementwise)."""
    original = np.allclose

    def allclose(a, b, *args, **kwargs):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or a.shape != b.shape or a.size <= OVERFLOW_CHUNK:
            return original(a, b, *args, **kwargs)
        flat_a, flat_b = a.reshape(-1), b.reshape(-1)
        return all(original(flat_a[i:i + OVERFLOW_CHUNK], flat_b[i:i + OVERFLOW_CHUNK], *args, **kwargs)
                   for i in range(0, a.size, OVERFLOW_CHUNK))

    np.allclose = allclose
    try:
        yield
    finally:
        np.allclose = original


def save_multifunction(parts: dict, default: str, destination: Path) -> None:
    """``parts``: function name -> saved single-function .mlpackage. Identical weights are stored once."""
    ct = coremltools()
    descriptor = ct.utils.MultiFunctionDescriptor()
    for function, path in parts.items():
        descriptor.add_function(str(path), src_function_name="main", target_function_name=function)
    descriptor.default_function_name = default
    with _quiet(), frugal_allclose():
        ct.utils.save_multifunction(descriptor, str(destination))


def load_spec(path: Path):
    """The protobuf spec of a saved package (no Core ML runtime needed), read without writing to the package.

    ``coremltools.utils.load_spec`` opens a package through its ModelPackage class, whose destructor rewrites
    ``Manifest.json`` (through a temp file ``Manifest.<id>`` renamed over it): reading a spec would change the
    artifact folder, and a verification hashing the folder at that moment sees a file come and go. Here the
    manifest is read as JSON and the root model's spec file parsed directly."""
    ct = coremltools()
    path = Path(path)
    spec_file = root_model_file(path) if path.is_dir() else path
    spec = ct.proto.Model_pb2.Model()
    try:
        spec.ParseFromString(spec_file.read_bytes())
    except (OSError, ValueError) as exc:  # protobuf's DecodeError is a ValueError
        raise UsageError(f"{spec_file}: not a readable Core ML model spec ({exc})") from None
    return spec


def root_model_file(package: Path) -> Path:
    """The spec file (``Data/<path>``) that a .mlpackage's Manifest.json names as its root model."""
    import json

    manifest = package / "Manifest.json"
    try:
        data = json.loads(manifest.read_text())
        entry = data["itemInfoEntries"][data["rootModelIdentifier"]]
        relative = Path(entry["path"])
    except OSError as exc:
        raise UsageError(f"{manifest}: cannot read the package manifest ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{manifest}: not a Core ML package manifest (no root model entry)") from None
    if relative.is_absolute() or ".." in relative.parts:
        raise UsageError(f"{manifest}: root model path {str(relative)!r} leaves the package")
    return package / "Data" / relative


def mil_op_types(path: Path, function: str | None = None) -> dict:
    """op type -> count over a saved package's MIL program (all functions, or one)."""
    from collections import Counter

    spec = load_spec(path)
    counts: Counter = Counter()
    for name, func in spec.mlProgram.functions.items():
        if function and name != function:
            continue
        for block in func.block_specializations.values():
            _count_ops(block, counts)
    return dict(counts)


def _count_ops(block, counts) -> None:
    for op in block.operations:
        counts[op.type] += 1
        for inner in op.blocks:
            _count_ops(inner, counts)
