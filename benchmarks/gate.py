"""CI latency gate: compare a run with a saved baseline and fail when a case got slower.

Shared CI machines drift 10-20 % within minutes, so a raw comparison of milliseconds flags noise.
Three defences (docs/benchmarks.md explains them):
1. normalise: every sample is divided by the calibration workload's time measured in the same
   worker process, just before and after its repetitions (a slower machine slows both);
2. robust statistics: a metric regresses only if BOTH the best (minimum) and the median normalised
   sample are slower than the baseline's by more than the threshold (noise mostly adds time, so the
   minimum is stable; the median protects against one lucky repetition);
3. consistency: most repetitions (more than half) must individually be slower than the baseline's
   median by more than the threshold.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from sfedge.errors import UsageError

GATE_METRICS = ("ttft_ms", "decode_ms_per_token")  # lower is better; together they cover every stage


def parse_threshold(text: str) -> float:
    """'10%' or '10' -> 0.10"""
    raw = text.strip().rstrip("%").strip()
    try:
        value = float(raw) / 100.0
    except ValueError:
        raise UsageError(f"--max-regression takes a percentage such as 10% (got {text!r})") from None
    if value <= 0:
        raise UsageError(f"--max-regression must be > 0%, got {text!r}")
    return value


@dataclass
class MetricCheck:
    key: str
    metric: str
    baseline_median: float  # normalised (sample / calibration ms)
    current_median: float
    median_ratio: float
    min_ratio: float
    raw_median_ratio: float  # without normalisation, for information
    slower_share: float  # fraction of current repetitions slower than baseline median x (1 + threshold)
    regressed: bool


@dataclass
class GateReport:
    threshold: float
    checks: List[MetricCheck] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # current cases the baseline does not have
    unusable: List[str] = field(default_factory=list)  # failed cases, or records without samples

    @property
    def regressions(self) -> List[MetricCheck]:
        return [c for c in self.checks if c.regressed]

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.unusable

    def table(self) -> str:
        lines = [f"latency gate: max regression {self.threshold * 100:.1f} % (normalised by the calibration workload)",
                 f"{'case':<40} {'metric':<20} {'median':>8} {'min':>8} {'raw':>8} {'slower':>7}  verdict"]
        for c in self.checks:
            verdict = "REGRESSED" if c.regressed else "ok"
            lines.append(f"{c.key:<40} {c.metric:<20} {_pct(c.median_ratio):>8} {_pct(c.min_ratio):>8} "
                         f"{_pct(c.raw_median_ratio):>8} {c.slower_share * 100:>6.0f}%  {verdict}")
        lines += [f"not in the baseline (not gated): {key}" for key in self.missing]
        lines += [f"cannot gate (failed or no samples): {key}" for key in self.unusable]
        lines.append("PASS" if self.passed else f"FAIL: {len(self.regressions)} regression(s), {len(self.unusable)} unusable case(s)")
        return "\n".join(lines)


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def _normalised(record: dict, metric: str) -> Optional[List[float]]:
    samples = record.get("samples", {}).get(metric)
    calibration = record.get("calibration_ms", {}).get("mean")
    if not samples or not calibration:
        return None
    return [value / calibration for value in samples]


def check_metric(key: str, metric: str, baseline: dict, current: dict, threshold: float) -> Optional[MetricCheck]:
    base, cur = _normalised(baseline, metric), _normalised(current, metric)
    if not base or not cur:
        return None
    base_median, cur_median = statistics.median(base), statistics.median(cur)
    if base_median <= 0 or min(base) <= 0:
        return None
    median_ratio = cur_median / base_median
    min_ratio = min(cur) / min(base)
    raw_base, raw_cur = baseline["samples"][metric], current["samples"][metric]
    raw_ratio = statistics.median(raw_cur) / statistics.median(raw_base) if statistics.median(raw_base) else float("nan")
    slower_share = sum(v > base_median * (1 + threshold) for v in cur) / len(cur)
    regressed = median_ratio > 1 + threshold and min_ratio > 1 + threshold and slower_share > 0.5
    return MetricCheck(key, metric, base_median, cur_median, median_ratio, min_ratio, raw_ratio, slower_share, regressed)


def compare(baseline: dict, current: dict, threshold: float, metrics: Sequence[str] = GATE_METRICS) -> GateReport:
    report = GateReport(threshold)
    reference: Dict[str, dict] = {r["key"]: r for r in baseline.get("results", []) if r.get("status") == "ok"}
    for record in current.get("results", []):
        key = record.get("key", "?")
        if record.get("status") != "ok":
            report.unusable.append(key)
            continue
        if key not in reference:
            report.missing.append(key)
            continue
        checks = [check_metric(key, metric, reference[key], record, threshold) for metric in metrics]
        if not any(checks):
            report.unusable.append(key)
        report.checks += [c for c in checks if c]
    return report
