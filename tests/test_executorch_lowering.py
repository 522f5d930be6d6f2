"""The LLM's lowering shortcut: dynamic-quant linear partitions run only ConvertToLinearPass in XNNPACK's
preprocess (executorch's ``dqlinear_partitioner`` compile spec), and give the same program and delegate payloads
as the full 17-pass pipeline (``SFEDGE_ET_DQ_ALL_PASSES=1``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("executorch", reason="the executorch extra is not installed (pip install 'sfedge[executorch]')")

from sfedge.export import executorch as et_export  # noqa: E402
from sfedge.manifest import Component  # noqa: E402
from sfedge.quantize.executorch import LINEAR_8DA4W_G32, quantize_component  # noqa: E402


class _Block(nn.Module):
    """A decoder-like block: linears that share an input (q/k/v, gate/up), a gated MLP, a residual add."""

    def __init__(self, width: int = 64, inner: int = 128):
        super().__init__()
        self.q, self.k = nn.Linear(width, width, bias=True), nn.Linear(width, 32, bias=True)
        self.gate, self.up = nn.Linear(width, inner, bias=False), nn.Linear(width, inner, bias=False)
        self.down = nn.Linear(inner, width, bias=False)

    def forward(self, x):
        h = x + self.q(x) * self.k(x).mean(-1, keepdim=True)
        return h + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


def _lowered(monkeypatch, all_passes: bool):
    from executorch.exir._serialize._program import deserialize_pte_binary
    if all_passes:
        monkeypatch.setenv(et_export.ENV_ALL_PASSES, "1")
    else:
        monkeypatch.delenv(et_export.ENV_ALL_PASSES, raising=False)
    torch.manual_seed(0)
    block = _Block().eval()
    quantize_component(block, Component.TEXT_DECODER.value, LINEAR_8DA4W_G32)
    tokens = torch.export.Dim("tokens", min=1, max=16)
    program = et_export._trace(block, (torch.randn(1, 4, 64),), ({1: tokens},))
    data = et_export.lower_programs({"forward": program})
    return data, deserialize_pte_binary(data)


@pytest.mark.slow
def test_dq_linear_partitions_skip_passes_and_store_the_same(monkeypatch):
    data_fast, fast = _lowered(monkeypatch, all_passes=False)
    data_full, full = _lowered(monkeypatch, all_passes=True)
    fast_program, full_program = getattr(fast, "program", fast), getattr(full, "program", full)
    specs = [[spec.key for spec in delegate.compile_specs] for plan in fast_program.execution_plan
             for delegate in plan.delegates]
    assert [et_export.DQ_LINEAR_SPEC] in specs, "no dynamic-quant partition carries the compile spec"
    assert [] in specs, "the second partitioner's partitions keep the full pass pipeline"
    assert all(not delegate.compile_specs for plan in full_program.execution_plan for delegate in plan.delegates)
    for program in (fast_program, full_program):
        for plan in program.execution_plan:
            for delegate in plan.delegates:
                delegate.compile_specs = []
    assert fast_program.backend_delegate_data, "delegate payloads not restored inline"
    assert fast_program == full_program  # same ops, same delegates and their payloads (restored inline from segments)
    assert fast.named_data == full.named_data and fast.mutable_data == full.mutable_data  # same packed weights
    assert len(data_fast) - len(data_full) < 256 * len(specs)  # only the compile-spec entries differ in size
