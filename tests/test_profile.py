"""`sfedge profile`: per-operator tables from ETDump (ExecuTorch) and ONNX Runtime's profiler."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sfedge.benchmarks.op_profile import INSIDE, OUTSIDE, feeds_for, op_kind, rows_from_events
from sfedge.errors import SfedgeError
from sfedge.manifest import ArtifactEntry, TensorSpec

def test_op_kind_merges_numbered_delegate_ops_and_portable_calls():
    assert op_kind("Fully Connected (NC, QDU8, F32, QC8W) GEMM #12") == "Fully Connected (NC, QDU8, F32, QC8W) GEMM"
    assert op_kind("native_call_where.self_out") == "where.self_out"


def test_rows_sum_calls_and_shares_per_op_and_place():
    events = [("GEMM #1", INSIDE, 3.0), ("GEMM #2", INSIDE, 1.0), ("native_call_where.self_out", OUTSIDE, 5.0)]
    rows, by_where = rows_from_events(events, total_ms=10.0)
    assert [(r.op, r.calls, r.total_ms, r.share, r.where) for r in rows] == [
        ("where.self_out", 1, 5.0, 0.5, OUTSIDE), ("GEMM", 2, 4.0, 0.4, INSIDE)]
    assert by_where == {OUTSIDE: 5.0, INSIDE: 4.0}


def _decoder_entry() -> ArtifactEntry:
    return ArtifactEntry("text_decoder", "decoder.onnx", "", 0,
                         [TensorSpec("inputs_embeds", [1, "sequence_length", 8], "float32"),
                          TensorSpec("attention_mask", [1, "total_sequence_length"], "int64"),
                          TensorSpec("position_ids", [1, "sequence_length"], "int64"),
                          TensorSpec("past_key_values.0.key", [1, 2, "past_sequence_length", 4], "float32")], [], {})


def test_feeds_resolve_symbolic_dims_per_case():
    feeds = feeds_for(_decoder_entry(), tokens=1, position=37, batch=1)
    assert feeds["inputs_embeds"].shape == (1, 1, 8)
    assert feeds["attention_mask"].shape == (1, 38) and feeds["attention_mask"].all()
    assert feeds["position_ids"].tolist() == [[37]]
    assert feeds["past_key_values.0.key"].shape == (1, 2, 37, 4) and not feeds["past_key_values.0.key"].any()


def test_unknown_symbolic_dim_is_a_one_line_error():
    entry = ArtifactEntry("vision_encoder", "v.onnx", "", 0, [TensorSpec("pixels", ["frames_wat", 3], "float32")], [], {})
    with pytest.raises(SfedgeError, match="v.onnx: input pixels has a symbolic dim 'frames_wat'"):
        feeds_for(entry, 1, 0, 1)


def _check(folder: Path, capsys, tmp_path: Path) -> list:
    from sfedge.cli import main
    from sfedge.manifest import read_manifest

    manifest = read_manifest(folder)
    options, frames = manifest.export_options, manifest.model_config["slowfast"]["frames"]
    out = tmp_path / "profile.json"
    assert main(["profile", str(folder), "--positions", "10,500", "--top", "5", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    profiles = json.loads(out.read_text())
    labels = [(p["component"], p["case"]) for p in profiles]
    assert labels == [("vision_encoder", f"batch {options['encoder_batch']}"), ("projector", f"{frames} frames"),
                      ("text_decoder", f"prefill {options['prefill_chunk']} @0"), ("text_decoder", "decode @10"),
                      ("text_decoder", f"decode @{options['max_context'] - 1}")]  # 500 clipped to the export's context
    assert options["max_context"] < 500
    for p in profiles:
        assert p["total_ms"] > 0 and p["ops"], p["case"]
        assert sum(op["total_ms"] for op in p["ops"]) <= p["total_ms"] * 1.05 + 0.5, p  # ops fit in the call
        assert f"## {p['component']} [{p['case']}]" in text
    return profiles


@pytest.mark.slow
def test_profile_executorch_folder(executorch_export, tmp_path: Path, capsys):
    """The fp32 folder test_executorch.py checks (shared): one LLM layer, one vision block, encoder batch 2."""
    profiles = _check(executorch_export("fp32"), capsys, tmp_path)
    vision = profiles[0]
    assert set(vision["by_where"]) == {INSIDE}, vision["by_where"]  # the whole encoder in the XNNPACK delegate
    decoder_ops = {op["op"] for p in profiles[2:] for op in p["ops"]}
    assert "llama::custom_sdpa.out" in decoder_ops


@pytest.mark.slow
def test_profile_onnx_folder(tiny_onnx, tmp_path: Path, capsys):
    profiles = _check(tiny_onnx, capsys, tmp_path)
    assert all(set(p["by_where"]) == {"CPUExecutionProvider"} for p in profiles)
    assert any(op["op"] in ("MatMul", "Gemm", "FusedMatMul") for op in profiles[2]["ops"])
