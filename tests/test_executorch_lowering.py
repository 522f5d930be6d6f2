"""The LLM's lowering shortcuts give the same programs: dynamic-quant linear partitions run only ConvertToLinearPass
in XNNPACK's preprocess (executorch's ``dqlinear_partitioner`` compile spec; the full 17-pass pipeline with
``SFEDGE_ET_DQ_ALL_PASSES=1``), and re-decompositions with nothing to decompose are skipped
(``SFEDGE_ET_ALL_DECOMPOSITIONS=1`` runs them all). Unknown values of these switches are errors."""
from __future__ import annotations

import contextlib

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


def _decoder_lowered(monkeypatch, all_decompositions: bool, counts: list):
    """A 2-layer 8da4w text decoder with ExecuTorch's custom attention ops and a dynamic token count (the LLM's
    shape of graph: shape reads, two partitioners), lowered to bytes."""
    import dataclasses

    from sfedge.config import get_preset
    from sfedge.export import executorch_decompositions as decompositions
    from sfedge.export.executorch_llm import use_custom_ops
    from sfedge.models import WeightsSource, build_model

    if all_decompositions:
        monkeypatch.setenv(decompositions.ENV_ALL_DECOMPOSITIONS, "1")
    else:
        monkeypatch.delenv(decompositions.ENV_ALL_DECOMPOSITIONS, raising=False)
    tiny = get_preset("tiny")
    config = tiny.replace(llm=dataclasses.replace(tiny.llm, layers=2))
    decoder = build_model(config, WeightsSource(seed=0), 64).text_decoder
    quantize_component(decoder, Component.TEXT_DECODER.value, LINEAR_8DA4W_G32)
    use_custom_ops(decoder, "causal")
    tokens = torch.export.Dim("tokens", min=1, max=16)
    program = et_export._trace(decoder, (torch.zeros(1, 2, config.llm.hidden), torch.zeros(1, dtype=torch.long)),
                               ({1: tokens}, None))
    original = decompositions.skip_noop_decompositions

    @contextlib.contextmanager
    def counted():  # record what the lowering's block ran and skipped
        with original() as count:
            yield count
        counts.append(count)

    monkeypatch.setattr(et_export, "skip_noop_decompositions", counted)
    return et_export.lower_programs({"text_decoder": program})


@pytest.mark.slow
def test_skipping_noop_decompositions_lowers_the_same_bytes(monkeypatch):
    fast_counts, full_counts = [], []
    fast = _decoder_lowered(monkeypatch, all_decompositions=False, counts=fast_counts)
    full = _decoder_lowered(monkeypatch, all_decompositions=True, counts=full_counts)
    assert fast_counts[0].skipped >= 3, f"expected the 3 later re-decompositions skipped, got {fast_counts[0]}"
    assert fast_counts[0].ran >= 2  # functionalize + the first partitioner's first pass still run
    assert full_counts[0].skipped == 0
    assert fast == full  # byte for byte: the skipped calls had nothing to decompose


@pytest.mark.parametrize("variable", ["SFEDGE_ET_ALL_DECOMPOSITIONS", "SFEDGE_ET_DQ_ALL_PASSES", "SFEDGE_ET_HQQ"])
def test_an_unknown_value_of_an_exporter_switch_is_a_one_line_error(monkeypatch, variable):
    from sfedge.errors import UsageError, env_switch
    from sfedge.export import executorch_decompositions
    from sfedge.quantize import executorch_hqq

    monkeypatch.setenv(variable, "yes please")
    check = {"SFEDGE_ET_ALL_DECOMPOSITIONS": lambda: executorch_decompositions.skip_noop_decompositions().__enter__(),
             "SFEDGE_ET_DQ_ALL_PASSES": lambda: et_export._partitioners(et_export._executorch()),
             "SFEDGE_ET_HQQ": executorch_hqq.use_torchao_hqq}[variable]
    with pytest.raises(UsageError, match=f"{variable}='yes please' is not understood"):
        check()
    monkeypatch.setenv(variable, "")
    assert env_switch(variable, ("1",)) == ""  # empty: the default
