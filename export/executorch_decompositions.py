"""Skip ExecuTorch's re-decompositions that have nothing to decompose (same .pte, ~25% less lowering CPU).

``to_edge_transform_and_lower`` re-traces every method's whole graph with ``ExportedProgram.run_decompositions``
five times when a method has two XNNPACK partitioners: once to functionalize, then twice per partitioner (a
first pass that keeps the partitioner's ops, a second after hiding them). After the first partitioner's first
pass the graph holds only core ATen ops and the ops the partitioners keep; the three later passes find nothing
in their table but ``aten.sym_size.int`` (a shape read, which a re-trace writes back as it was) and re-trace the
graph for nothing: ~12 s CPU per 3B decoder layer (/work/scratch/s8/decomp_probe3.py, 6-layer 3B-shape export).

``skip_noop_decompositions()`` returns the program unchanged from a ``run_decompositions(table)`` call whose
non-empty table holds none of the graph's ops except shape reads (ExecuTorch applies the same test to the
partitioners that need no ``EDGE_DO_NOT_DECOMP``; ``executorch.exir.graph_module.contains_any_call_fn_target_op``).
A ``run_decompositions({})`` (functionalize) or ``(None)`` (core ATen) call always runs. Same lowered bytes
(tests/test_executorch_lowering.py; the 2- and 6-layer 3B-shape exports' three .pte files compared with cmp).
``SFEDGE_ET_ALL_DECOMPOSITIONS=1`` runs every call as ExecuTorch does.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from sfedge.errors import env_switch

ENV_ALL_DECOMPOSITIONS = "SFEDGE_ET_ALL_DECOMPOSITIONS"  # "1": every run_decompositions call re-traces, as ExecuTorch does


def _shape_reads() -> frozenset:
    aten = torch.ops.aten
    return frozenset({aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default})


@dataclass
class DecompositionCount:
    """How many ``run_decompositions`` calls ran and how many were skipped inside one ``with`` block."""
    ran: int = 0
    skipped: int = 0


@contextlib.contextmanager
def skip_noop_decompositions() -> Iterator[DecompositionCount]:
    """Within the block, ``ExportedProgram.run_decompositions(table)`` returns the program itself when no op of
    the graph (shape reads aside) is in ``table``. Yields the count of calls run and skipped."""
    from executorch.exir.graph_module import contains_any_call_fn_target_op
    from torch.export import ExportedProgram

    count = DecompositionCount()
    if env_switch(ENV_ALL_DECOMPOSITIONS, ("1",)) == "1":
        yield count
        return
    original = ExportedProgram.run_decompositions
    shape_reads = _shape_reads()

    def run_decompositions(self, decomp_table=None, *args, **kwargs):
        if isinstance(decomp_table, dict) and decomp_table:
            decomposable = {op for op in decomp_table if op not in shape_reads}
            if not contains_any_call_fn_target_op(self.graph_module, decomposable):
                count.skipped += 1
                return self
        count.ran += 1
        return original(self, decomp_table, *args, **kwargs)

    ExportedProgram.run_decompositions = run_decompositions
    try:
        yield count
    finally:
        ExportedProgram.run_decompositions = original
