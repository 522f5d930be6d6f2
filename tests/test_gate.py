"""The latency gate on synthetic records: it cannot pass empty, matches cases by what they measure
(not the folder's name), refuses bad thresholds, and says INCONCLUSIVE instead of flipping on noise."""
from __future__ import annotations

import math
import random

import pytest

from sfedge.benchmarks.gate import case_identity, compare, parse_threshold
from sfedge.benchmarks.gate_stats import decide
from sfedge.errors import SfedgeError, UsageError


def _record(key: str, samples, calibration: float = 10.0, folder: str = "out/tiny_onnx_int4", frames: int = 8,
            recipe: str = "int4", status: str = "ok") -> dict:
    if status != "ok":
        return {"key": key, "status": status, "note": "boom", "case": {"gen_tokens": 8}}
    return {"key": key, "source": folder.split("/")[-1], "status": "ok", "calibration_ms": {"mean": calibration},
            "samples": {"ttft_ms": list(samples), "decode_ms_per_token": list(samples)},
            "frames": frames, "threads": 1,
            "case": {"source": {"folder": folder}, "frames": frames, "prompt_tokens": None, "gen_tokens": 8},
            "model": {"preset": "tiny", "backend": "onnx", "recipe": recipe, "max_context": 128, "prefill_chunk": 32,
                      "slowfast": "slowfast-slow_10frms_spatial_1d_max_pool-fast_4x4",
                      "parameters": {"total": 123456}}}


def _doc(*records) -> dict:
    return {"results": list(records)}


BASE = [100, 101, 102, 103, 104]


def test_thresholds_are_validated():
    assert parse_threshold("10%") == pytest.approx(0.10) and parse_threshold("2.5") == pytest.approx(0.025)
    assert parse_threshold("1000%") == pytest.approx(10.0)
    for bad in ("nan", "NaN%", "inf", "-inf", "0", "0%", "-5%", "1001%", "1e9", "ten", ""):
        with pytest.raises(UsageError, match="--max-regression"):
            parse_threshold(bad)


def test_gate_that_checked_nothing_fails():
    report = compare(_doc(_record("a", BASE)), _doc(_record("b", BASE, frames=4)), 0.10)
    assert not report.passed and not report.checks
    assert len(report.not_in_baseline) == 1 and len(report.not_run) == 1
    assert "checked 0 metrics" in report.table().splitlines()[-1]
    assert not compare(_doc(), _doc(_record("a", BASE)), 0.10).passed  # an empty baseline gates nothing
    assert not compare(_doc(_record("a", BASE)), _doc(), 0.10).passed  # nor does an empty run


def test_baseline_cases_that_did_not_run_fail_unless_allowed():
    baseline = _doc(_record("a", BASE), _record("b", BASE, frames=4))
    current = _doc(_record("a", BASE), _record("c", BASE, frames=16))
    report = compare(baseline, current, 0.10)
    assert not report.passed and len(report.not_run) == 1 and report.not_run[0].startswith("b ")
    assert len(report.not_in_baseline) == 1 and report.not_in_baseline[0].startswith("c ")  # reported, counted
    allowed = compare(baseline, current, 0.10, allow_missing=True)
    assert allowed.passed and "not run (allowed)" in allowed.table()


def test_renamed_folder_still_matches():
    baseline = _doc(_record("tiny_onnx_int4 f8+tg8+t1", BASE, folder="out/tiny_onnx_int4"))
    current = _doc(_record("renamed f8+tg8+t1", BASE, folder="elsewhere/renamed"))
    report = compare(baseline, current, 0.10)
    assert report.passed and len(report.checks) == 2 and not report.not_run and not report.not_in_baseline
    other_recipe = _doc(_record("renamed f8+tg8+t1", BASE, folder="elsewhere/renamed", recipe="int8"))
    assert not compare(baseline, other_recipe, 0.10).passed  # a different model is not the same case


def test_old_style_records_are_refused_with_a_message():
    with pytest.raises(SfedgeError, match="re-save the baseline"):
        compare(_doc({"key": "a", "status": "ok", "samples": {}}), _doc(_record("a", BASE)), 0.10)
    with pytest.raises(SfedgeError, match="not a list"):
        compare({"results": "x"}, _doc(_record("a", BASE)), 0.10)
    assert "tiny onnx/int4" in case_identity(_record("a", BASE))


def test_failed_current_case_fails_the_gate():
    report = compare(_doc(_record("a", BASE)), _doc(_record("a", [], status="failed")), 0.10)
    assert not report.passed and report.unusable == ["a"] and not report.not_run


def test_robust_rules_still_hold():
    base = _doc(_record("a", BASE))
    assert compare(base, _doc(_record("a", [200, 202, 204, 206, 208], calibration=20.0)), 0.10).passed  # machine slowed
    one_outlier = compare(base, _doc(_record("a", [100, 101, 102, 250, 104])), 0.10)
    assert not one_outlier.regressions  # one slow repetition is not a regression


def _lognormal(rng: random.Random, n: int, cv: float, scale: float = 1.0) -> list:
    return [scale * math.exp(rng.gauss(0.0, cv)) for _ in range(n)]


@pytest.mark.parametrize("cv", [0.01, 0.05, 0.15, 0.40])
@pytest.mark.parametrize("repetitions", [2, 3, 5, 10])
def test_identical_distributions_never_fail(cv, repetitions):
    rng = random.Random(1000 * repetitions + int(cv * 100))
    verdicts = {"ok": 0, "INCONCLUSIVE": 0, "REGRESSED": 0}
    for _ in range(300):
        base, cur = _lognormal(rng, repetitions, cv), _lognormal(rng, repetitions, cv)
        report = compare(_doc(_record("a", base)), _doc(_record("a", cur)), 0.10)
        for check in report.checks:
            verdicts[check.verdict] += 1
    assert verdicts["REGRESSED"] == 0, verdicts
    if cv <= 0.01:  # quiet: decided
        assert verdicts["INCONCLUSIVE"] == 0, verdicts


@pytest.mark.parametrize("repetitions,slowdown", [(3, 3.0), (5, 2.0), (10, 1.5)])
def test_slowdown_well_above_noise_fails(repetitions, slowdown):
    rng = random.Random(repetitions)
    for _ in range(100):
        base, cur = _lognormal(rng, repetitions, 0.05), _lognormal(rng, repetitions, 0.05, scale=slowdown)
        report = compare(_doc(_record("a", base)), _doc(_record("a", cur)), 0.10)
        assert not report.passed and len(report.regressions) == 2, report.table()


def test_noisy_case_is_inconclusive_with_the_repetitions_it_needs():
    base, cur = [1.0, 1.4, 0.8], [1.3, 0.9, 1.5]  # 25 % noise, 10 % threshold
    report = compare(_doc(_record("a", base)), _doc(_record("a", cur)), 0.10)
    assert [c.verdict for c in report.checks] == ["INCONCLUSIVE", "INCONCLUSIVE"]
    needed = report.checks[0].repetitions_needed
    assert needed and needed > 3
    assert not report.passed and "inconclusive" in report.table().splitlines()[-1]
    assert compare(_doc(_record("a", base)), _doc(_record("a", cur)), 0.10, allow_inconclusive=True).passed is False
    # ... because then nothing was checked conclusively; with one decided case beside it, it passes
    quiet = _record("q", [1.0, 1.001, 0.999], frames=4)
    allowed = compare(_doc(_record("a", base), quiet), _doc(_record("a", cur), quiet), 0.10, allow_inconclusive=True)
    assert allowed.passed and "inconclusive (allowed)" in allowed.table()
    # the estimate is enough: with that many repetitions of the same noise the verdict is decided
    rng = random.Random(0)
    decided = [decide(_lognormal(rng, needed * 2, 0.25), _lognormal(rng, needed * 2, 0.25), 0.10).verdict for _ in range(20)]
    assert decided.count("ok") >= 15, decided


def test_single_repetitions_cannot_measure_noise():
    decision = decide([1.0], [1.02], 0.10)
    assert decision.verdict == "INCONCLUSIVE" and decision.repetitions_needed == 2


@pytest.mark.parametrize("extra,fragment", [
    (["--baseline", "{base}", "--max-regression", "nan"], "--max-regression must be a finite percentage"),
    (["--baseline", "{base}", "--max-regression", "inf%"], "--max-regression must be a finite percentage"),
    (["--baseline", "{base}", "--max-regression", "0"], "--max-regression must be a finite percentage"),
    (["--baseline", "{base}", "--max-regression=-10%"], "--max-regression must be a finite percentage"),
    (["--baseline", "{base}", "--max-regression", "5000%"], "at most 1000%"),
    (["--allow-missing"], "pass --baseline FILE"),
    (["--baseline", "{tmp}/nope.json"], "is not a file"),
    (["--baseline", "{old}"], "re-save the baseline"),
    (["--baseline", "{empty}"], "has no successful results"),
    (["--save-baseline", "{tmp}"], "must name a file"),
    (["--save-baseline", "{base}/x.json"], "is a file, not a folder"),
])
def test_bench_gate_flags_fail_before_running(tmp_path, capsys, extra, fragment):
    import json

    from sfedge.benchmarks.runner import SCHEMA
    from sfedge.cli import main

    paths = {"tmp": str(tmp_path), "base": str(tmp_path / "base.json"), "old": str(tmp_path / "old.json"),
             "empty": str(tmp_path / "empty.json")}
    (tmp_path / "base.json").write_text(json.dumps({"schema": SCHEMA, "results": [_record("a", BASE)]}))
    (tmp_path / "old.json").write_text(json.dumps({"schema": SCHEMA, "results": [{"key": "a", "status": "ok"}]}))
    (tmp_path / "empty.json").write_text(json.dumps({"schema": SCHEMA, "results": []}))
    code = main(["bench", "--model", "tiny", "--gen-tokens", "2", "-r", "1", *[a.format(**paths) for a in extra]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and len(err) == 1 and fragment in err[0], err
