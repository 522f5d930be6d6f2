"""benchmarks/chunk_probe.py: both kernels in a .pte on the tiny preset's heads, and its usage errors."""
import pytest

pytest.importorskip("executorch", reason="the executorch extra is not installed (pip install 'sfedge[executorch]')")

from sfedge.benchmarks import chunk_probe  # noqa: E402


@pytest.mark.slow
def test_probe_times_both_kernels(capsys):
    assert chunk_probe.main(["--model", "tiny", "--tokens", "8", "--positions", "0,40", "--capacity", "64", "-r", "1",
                             "--threads", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| llama") or line.startswith("| sfedge")]
    assert [line.split("|")[1].strip() for line in lines] == ["llama.custom_sdpa (causal)"] * 2 + ["sfedge.chunk_attention"] * 2
    rows = chunk_probe.probe("tiny", 8, [0, 40], 1, ["causal", "chunk"], 64, repeats=1)
    assert [(row["mode"], row["position"]) for row in rows] == [("causal", 0), ("causal", 40), ("chunk", 0), ("chunk", 40)]
    assert all(row["ms"] > 0 and row["gflops"] > 0 for row in rows)


def test_probe_usage_errors(capsys):
    assert chunk_probe.main(["--model", "tiny", "--tokens", "8", "--positions", "60", "--capacity", "64"]) == 2
    assert "exceed --capacity 64" in capsys.readouterr().err
    assert chunk_probe.main(["--model", "tiny", "--modes", "flash"]) == 2
    assert "flash unknown" in capsys.readouterr().err
