"""`sfedge demo`: the eager answer alone (fast), and the whole job on the tiny preset (export to
ExecuTorch and ONNX, parity against eager, a benchmark of both against eager with plots)."""
from __future__ import annotations

import json

import pytest

from sfedge.cli import main


def test_demo_eager_only_and_bad_exports(capsys):
    assert main(["demo", "--eager-only", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "[eager] frames 8" in err and "visual tokens" in err and "TTFT" in err and "== export" not in err
    assert main(["demo", "--exports", "tflite:fp32"]) == 2
    assert "--exports: unknown backend 'tflite'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_exports_checks_and_benchmarks(tmp_path, capsys):
    pytest.importorskip("executorch", reason="the executorch extra is not installed")
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    assert main(["demo", "--out", str(tmp_path), "-r", "1", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert err.count("PASS") == 2  # one parity report per export
    for label in ("tiny_executorch_fp32", "tiny_onnx_fp32", "tiny@eager"):
        assert label in out  # the per-stage benchmark table
    document = json.loads((tmp_path / "plots" / "bench.json").read_text())
    assert [r["status"] for r in document["results"]] == ["ok"] * 3
    assert (tmp_path / "plots" / "ttft_breakdown.png").stat().st_size > 0 and "plots: " in err
