"""benchmarks/matmul_probe.py on the tiny preset's MLP shape: every scheme quantized by the export's code, timed, checked."""
from sfedge.benchmarks import matmul_probe


def test_probe_runs_every_scheme_within_its_error():
    rows = matmul_probe.probe("tiny", [1, 16], 1, matmul_probe.SCHEMES, repeats=1)
    assert [(row["scheme"], row["rows"]) for row in rows] == [(scheme, count) for scheme in matmul_probe.SCHEMES
                                                              for count in (1, 16)]
    bound = {"fp32": 1e-6, "int8": 0.05, "int8-channel": 0.05, "int4": 0.2}
    assert all(row["ms"] > 0 and row["max_rel_error"] <= bound[row["scheme"]] for row in rows), rows
    assert all(row["max_rel_error"] > 0 for row in rows if row["scheme"] != "fp32")  # the weights really were rounded


def test_probe_usage_errors(capsys):
    assert matmul_probe.main(["--model", "tiny", "--schemes", "int3"]) == 2
    assert "int3 unknown" in capsys.readouterr().err
    assert matmul_probe.main(["--model", "tiny", "--threads", "0"]) == 2
