"""`sfedge bench`: a smoke sweep on the eager tiny preset (each case in its own worker process),
the output formats, the plots, and the regression gate with a real injected slowdown."""
from __future__ import annotations

import csv
import io
import json

import pytest

from sfedge.benchmarks.cases import BenchCase, Source, Sweep
from sfedge.benchmarks.gate import compare, parse_threshold
from sfedge.benchmarks.printers import render
from sfedge.benchmarks.runner import load_document
from sfedge.cli import main
from sfedge.errors import UsageError

# threads 1: stable timings on a shared 2-core machine; gen 8 -> 7 decode steps per repetition
COMMON = ["--model", "tiny", "--gen-tokens", "8", "--threads", "1"]
# under pytest-xdist (--dist loadgroup) the module runs on one worker: its smoke sweep and gate baseline are made once
pytestmark = pytest.mark.xdist_group("bench")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, demo_video):
    """One sweep (frames 4 and 8, one repetition) written as JSON, plots and a baseline."""
    folder = tmp_path_factory.mktemp("bench")
    paths = {"json": folder / "bench.json", "plots": folder / "plots", "baseline": folder / "baseline.json",
             "folder": folder, "video": str(demo_video)}
    code = main(["bench", *COMMON, "--frames", "4,8", "-r", "1", "--video", str(demo_video), "--output", "json",
                 "--out", str(paths["json"]), "--plot", str(paths["plots"]), "--save-baseline", str(paths["baseline"])])
    assert code == 0
    paths["document"] = load_document(str(paths["json"]))
    return paths


def test_smoke_records_every_stage(smoke):
    results = smoke["document"]["results"]
    assert [r["key"] for r in results] == ["tiny@eager f4+tg8+t1", "tiny@eager f8+tg8+t1"]
    for record, frames in zip(results, (4, 8)):
        assert record["status"] == "ok" and record["frames"] == frames and record["threads"] == 1
        assert record["num_generated_tokens"] == 8
        assert record["num_prompt_tokens"] == record["visual_tokens"] + record["text_tokens"]
        metrics = record["metrics"]
        for name in ("video_decode_ms", "vision_encode_ms", "projector_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s"):
            assert metrics[name]["n"] == 1 and metrics[name]["mean"] > 0, name
            assert record["samples"][name] == [metrics[name]["mean"]]
        stages = sum(metrics[m]["mean"] for m in ("video_decode_ms", "preprocess_ms", "vision_encode_ms", "projector_ms",
                                                   "embed_ms", "prefill_ms"))
        assert stages <= metrics["ttft_ms"]["mean"]
        rss = record["rss_bytes"]
        assert rss["start"] <= rss["load"] <= rss["vision_encode"] <= rss["decode"] <= record["peak_rss_bytes"]
        assert record["provenance"]["cpu"] and record["provenance"]["libraries"]["torch"].startswith("2.13")
        assert 0 < record["roofline"]["decode_bandwidth_share"] < 1
        assert record["calibration_ms"]["mean"] > 0
    assert results[1]["visual_tokens"] > results[0]["visual_tokens"]


def test_output_formats_parse(smoke):
    document = smoke["document"]
    rows = list(csv.DictReader(io.StringIO(render(document, "csv"))))
    assert [row["name"] for row in rows] == ["f4+tg8+t1", "f8+tg8+t1"]
    assert float(rows[0]["ttft_ms_mean"]) > 0 and rows[0]["cpu"] and rows[0]["git_commit"] is not None
    assert json.loads(render(document, "json"))["results"][0]["key"] == document["results"][0]["key"]
    lines = render(document, "jsonl").splitlines()
    assert len(lines) == 2 and all(json.loads(line)["provenance"]["sfedge_version"] for line in lines)
    table = [line for line in render(document, "md").splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert len(table) == 4 and "frames" in header and "TTFT ms" in header
    assert "threads" not in header and "backend" not in header  # constant columns go above the table


def test_plots_written(smoke):
    for name in ("ttft_breakdown.png", "memory_vs_frames.png", "visual_tokens_vs_frames.png", "bench.csv", "bench.md"):
        path = smoke["plots"] / name
        assert path.exists() and path.stat().st_size > 0, name
    assert (smoke["plots"] / "ttft_breakdown.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def gate_baseline(smoke):
    """A baseline with enough repetitions to measure its noise (the smoke run's single one cannot)."""
    path = smoke["folder"] / "gate_baseline.json"
    assert main(["bench", *COMMON, "--frames", "4", "-r", "5", "--no-limits", "--video", smoke["video"],
                 "--out", str(smoke["folder"] / "gate_base.md"), "--save-baseline", str(path)]) == 0
    return path


def _gate_run(smoke, baseline, *extra) -> int:
    return main(["bench", *COMMON, "--frames", "4", "-r", "5", "--no-limits", "--video", smoke["video"],
                 "--out", str(smoke["folder"] / "gate.md"), "--baseline", str(baseline),
                 "--max-regression", "300%", *extra])


def test_gate_passes_without_change(smoke, gate_baseline, capsys):
    """Same code: never REGRESSED. On a loaded machine a metric may be INCONCLUSIVE (noise above the
    threshold, with the repetitions it would need) and that fails by default, but it never flips."""
    code = _gate_run(smoke, gate_baseline)
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert "REGRESSED" not in err, err
    assert (code == 0 and last.startswith("PASS: 2 metric(s) of 1 case(s) checked")) or \
        (code == 1 and "inconclusive" in last and "regression" not in last), err


def test_gate_fails_on_injected_decode_delay(smoke, gate_baseline, capsys):
    # the worker really sleeps 100 ms in each decode step (tiny decodes a token in a few ms)
    assert _gate_run(smoke, gate_baseline, "--inject-delay-ms", "100") == 1
    (row,) = [line for line in capsys.readouterr().err.splitlines() if "decode_ms_per_token" in line]
    # REGRESSED; on a machine so loaded that the repetitions spread by more than the slowdown's own
    # size (seen here: 125 % noise with 9 sessions on 2 cores) the gate says INCONCLUSIVE: never ok
    assert row.endswith("REGRESSED") or " INCONCLUSIVE (needs" in row, row


def test_gate_fails_when_it_gated_nothing(smoke, gate_baseline, capsys):
    """--frames 8 is not in the baseline (frames 4): the run is reported, the baseline case is
    missing, and the gate fails instead of passing with zero checks (synthetic cases: tests/test_gate.py)."""
    code = main(["bench", *COMMON, "--frames", "8", "-r", "1", "--no-limits", "--video", smoke["video"],
                 "--out", str(smoke["folder"] / "gate8.md"), "--baseline", str(gate_baseline), "--allow-missing"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert code == 1 and last.startswith("FAIL: the gate checked 0 metrics"), last


def _record(key: str, samples: list, calibration: float) -> dict:
    return {"key": key, "status": "ok", "calibration_ms": {"mean": calibration}, "frames": 8, "threads": 1,
            "samples": {"ttft_ms": samples, "decode_ms_per_token": samples},
            "case": {"frames": 8, "prompt_tokens": None, "gen_tokens": 8},
            "model": {"preset": "tiny", "backend": "eager", "recipe": "fp32", "slowfast": "slowfast-slow_4frms_spatial_1d_max_pool-fast_2x2",
                      "max_context": 256, "prefill_chunk": 64, "parameters": {"total": 1}}}


def test_gate_statistics():
    base = {"results": [_record("a", [100, 101, 102, 103, 104], 10.0)]}
    slower = {"results": [_record("a", [136, 137, 138, 139, 140], 10.0)]}
    assert not compare(base, slower, 0.10).passed  # consistent +35 %, noise 1.5 %
    one_outlier = {"results": [_record("a", [100, 101, 102, 250, 104], 10.0)]}
    assert not compare(base, one_outlier, 0.10).regressions  # one slow repetition is noise, not a regression
    slow_machine = {"results": [_record("a", [200, 202, 204, 206, 208], 20.0)]}
    assert compare(base, slow_machine, 0.10).passed  # the calibration workload slowed down as much
    # a case missing from the baseline is no longer a silent PASS: see tests/test_gate.py
    assert parse_threshold("10%") == pytest.approx(0.10) and parse_threshold("2.5") == pytest.approx(0.025)
    with pytest.raises(UsageError):
        parse_threshold("ten")


def test_sweep_expansion_and_names(capsys):
    assert main(["bench", "--model", "tiny", "--frames", "4,8", "--prompt-tokens", "64", "--gen-tokens", "8,16",
                 "--threads", "1,2", "--list"]) == 0
    keys = capsys.readouterr().out.split("\n")
    assert "tiny@eager f4+pp64+tg8+t1" in keys and "tiny@eager f8+pp64+tg16+t2" in keys
    assert len([k for k in keys if k]) == 8
    case = BenchCase(Source(preset="tiny"), "v.mp4", frames=32, prompt_tokens=256, gen_tokens=64)
    assert case.name == "f32+pp256+tg64"
    assert BenchCase.from_dict(json.loads(case.to_json())) == case
    assert Sweep([Source(preset="tiny")], "v.mp4").expand()[0].frames == 8  # the preset's frame count


def test_prompt_tokens_are_exact():
    from sfedge.benchmarks.worker import question_for
    from sfedge.config import get_preset
    from sfedge.prompt import tokenize_prompt
    from sfedge.tokenizer import load_tokenizer

    config = get_preset("tiny")
    tokenizer = load_tokenizer(config)
    for wanted in (40, 64, 257):
        question = question_for(tokenizer, config.prompt_template, wanted)
        assert tokenize_prompt(tokenizer, question, config.prompt_template).text_tokens == wanted
    with pytest.raises(UsageError):
        question_for(tokenizer, config.prompt_template, 3)


def test_usage_errors(tmp_path, capsys):
    assert main(["bench"]) == 2
    assert main(["bench", "--backend", "eager", "--model", "tiny"]) == 2
    assert main(["bench", str(tmp_path / "missing")]) == 1
    assert main(["bench", "--model", "tiny", "--frames", "0,8", "--list"]) == 2
    assert main(["bench", "--model", "nope", "--list"]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_artifact_folder_fixes_frames(tiny_onnx, tmp_path, demo_video):
    """An exported folder (ONNX, the quickest export here): its frame count is fixed, other values are
    skipped with a note, and the artifact bytes come from the files."""
    from sfedge.manifest import path_bytes

    folder = tiny_onnx
    out = tmp_path / "bench.jsonl"
    assert main(["bench", str(folder), "--frames", "4,8", "-r", "1", "--gen-tokens", "8", "--threads", "1",
                 "--no-limits", "--video", str(demo_video), "--output", "jsonl", "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["key"] == "tiny_onnx_fp32 f8+tg8+t1" and record["model"]["backend"] == "onnx"
    files = {p.name for p in folder.iterdir()} - {"manifest.json", "tokenizer.json"}
    assert record["artifact_bytes"]["total"] == sum(path_bytes(folder / name) for name in files)
    assert record["work"]["weight_bytes_source"] == "artifact"
    assert record["metrics"]["ttft_ms"]["mean"] > 0
