"""CI latency gate: compare a run with a saved baseline and fail when a case got slower.

Shared CI machines drift 10-20 % within minutes, so a raw comparison of milliseconds flags noise.
Defences (docs/benchmarks.md explains them):
1. normalise: every sample is divided by the calibration workload's time measured in the same
   worker process, just before and after its repetitions (a slower machine slows both);
2. noise-aware verdict (benchmarks/gate_stats.py): a metric is REGRESSED only when the slowdown
   exceeds the threshold beyond the measured noise, ok when it is below it beyond the noise, and
   INCONCLUSIVE otherwise, with the repetitions that would decide;
3. robust statistics on top of REGRESSED: both the best (minimum) and the median normalised sample
   must be slower than the threshold, and more than half the repetitions must individually be.

The gate cannot pass empty: it fails when no metric got a conclusive verdict, when a baseline case
did not run (unless allow_missing), and when a metric is inconclusive (unless allow_inconclusive).
Cases are matched by what they measure (case_identity), not by the artifact folder's name.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from sfedge.benchmarks.gate_stats import MAX_REPETITIONS, decide
from sfedge.errors import SfedgeError, UsageError

GATE_METRICS = ("ttft_ms", "decode_ms_per_token")  # lower is better; together they cover every stage
MAX_THRESHOLD = 10.0  # 1000 %: beyond it a "gate" lets a 10x slowdown through


def parse_threshold(text: str) -> float:
    """'10%' or '10' -> 0.10; nan, inf, <= 0 and > 1000 % are refused."""
    raw = str(text).strip().rstrip("%").strip()
    try:
        value = float(raw) / 100.0
    except ValueError:
        raise UsageError(f"--max-regression takes a percentage such as 10% (got {text!r})") from None
    if not math.isfinite(value) or value <= 0 or value > MAX_THRESHOLD:
        raise UsageError(f"--max-regression must be a finite percentage above 0% and at most "
                         f"{MAX_THRESHOLD * 100:.0f}%, got {text!r}")
    return value


def case_identity(record: dict, where: str = "") -> str:
    """What a result measured: model (preset, parameter count, SlowFast spec), backend, recipe, cache
    and chunk sizes, frames, prompt / generated tokens, threads. Not the folder's name."""
    model, case = record.get("model"), record.get("case")
    if not isinstance(model, dict) or not isinstance(case, dict):
        raise SfedgeError(f"{where}result {record.get('key', '?')!r} has no 'model'/'case' block (written by an older "
                          "or a foreign tool): re-save the baseline with `sfedge bench ... --save-baseline FILE`")
    from sfedge.benchmarks.cases import short_spec

    try:
        parameters = model["parameters"]["total"] if isinstance(model.get("parameters"), dict) else "?"
        prompt = case.get("prompt_tokens")
        return (f"{model['preset']} {model['backend']}/{model['recipe']} {parameters}p sf{short_spec(str(model['slowfast']))} "
                f"ctx{model['max_context']} chunk{model['prefill_chunk']} f{record['frames']}"
                f"+pp{'*' if prompt is None else prompt}+tg{case['gen_tokens']}+t{record['threads']}")
    except (KeyError, TypeError) as exc:
        raise SfedgeError(f"{where}result {record.get('key', '?')!r} lacks {exc} in its model/case description: "
                          "re-save the baseline with `sfedge bench ... --save-baseline FILE`") from None


@dataclass(frozen=True)
class MetricCheck:
    key: str  # the case's display key (its folder label, as printed by the bench)
    metric: str
    baseline_median: float  # normalised (sample / calibration ms)
    current_median: float
    median_ratio: float
    min_ratio: float
    raw_median_ratio: float  # without normalisation, for information
    slower_share: float  # fraction of current repetitions slower than baseline median x (1 + threshold)
    verdict: str  # "ok", "REGRESSED", "INCONCLUSIVE"
    noise: Optional[float] = None  # the larger CV of the normalised samples of the two sides
    repetitions_needed: Optional[int] = None
    reason: str = ""

    @property
    def regressed(self) -> bool:
        return self.verdict == "REGRESSED"

    @property
    def inconclusive(self) -> bool:
        return self.verdict == "INCONCLUSIVE"


@dataclass
class GateReport:
    threshold: float
    allow_missing: bool = False
    allow_inconclusive: bool = False
    checks: List[MetricCheck] = field(default_factory=list)
    not_in_baseline: List[str] = field(default_factory=list)  # current cases the baseline does not have
    not_run: List[str] = field(default_factory=list)  # baseline cases absent from the current run
    unusable: List[str] = field(default_factory=list)  # failed cases, or records without samples

    @property
    def regressions(self) -> List[MetricCheck]:
        return [c for c in self.checks if c.regressed]

    @property
    def inconclusive(self) -> List[MetricCheck]:
        return [c for c in self.checks if c.inconclusive]

    @property
    def conclusive(self) -> List[MetricCheck]:
        return [c for c in self.checks if not c.inconclusive]

    def failures(self) -> List[str]:
        out = []
        if not self.conclusive:
            out.append(f"the gate checked 0 metrics conclusively ({len(self.inconclusive)} inconclusive, "
                       f"{len(self.not_in_baseline)} current case(s) not in the baseline, "
                       f"{len(self.not_run)} baseline case(s) not run)")
        if self.regressions:
            out.append(f"{len(self.regressions)} regression(s)")
        if self.unusable:
            out.append(f"{len(self.unusable)} unusable case(s)")
        if self.not_run and not self.allow_missing:
            out.append(f"{len(self.not_run)} baseline case(s) did not run (--allow-missing to only report them)")
        if self.inconclusive and not self.allow_inconclusive:
            needed = max(c.repetitions_needed or 0 for c in self.inconclusive)
            out.append(f"{len(self.inconclusive)} inconclusive metric(s): noise above the threshold; about "
                       f"{_reps(needed)} repetitions per side would decide (--allow-inconclusive to only report them)")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def table(self) -> str:
        lines = [f"latency gate: max regression {self.threshold * 100:.1f} % (normalised by the calibration workload)",
                 f"{'case':<40} {'metric':<20} {'median':>8} {'min':>8} {'raw':>8} {'slower':>7} {'noise':>6}  verdict"]
        for c in self.checks:
            verdict = c.verdict + (f" (needs ~{_reps(c.repetitions_needed)} reps; {c.reason})" if c.inconclusive else "")
            noise = "?" if c.noise is None else f"{c.noise * 100:.1f}%"
            lines.append(f"{c.key:<40} {c.metric:<20} {_pct(c.median_ratio):>8} {_pct(c.min_ratio):>8} "
                         f"{_pct(c.raw_median_ratio):>8} {c.slower_share * 100:>6.0f}% {noise:>6}  {verdict}")
        lines += [f"not in the baseline (not gated): {key}" for key in self.not_in_baseline]
        lines += [f"in the baseline but not run{' (allowed)' if self.allow_missing else ''}: {key}" for key in self.not_run]
        lines += [f"cannot gate (failed or no samples): {key}" for key in self.unusable]
        failures = self.failures()
        if failures:
            lines.append("FAIL: " + "; ".join(failures))
        else:
            lines.append(f"PASS: {len(self.conclusive)} metric(s) of {len({c.key for c in self.checks})} case(s) checked"
                         + (f", {len(self.inconclusive)} inconclusive (allowed)" if self.inconclusive else ""))
        return "\n".join(lines)


def _reps(count: Optional[int]) -> str:
    return f"more than {MAX_REPETITIONS}" if count is None or count > MAX_REPETITIONS else str(count)


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def _normalised(record: dict, metric: str) -> Optional[List[float]]:
    samples = (record.get("samples") or {}).get(metric)
    calibration = (record.get("calibration_ms") or {}).get("mean")
    if not samples or not calibration or calibration <= 0:
        return None
    values = [value / calibration for value in samples]
    return values if all(math.isfinite(v) and v > 0 for v in values) else None


def check_metric(key: str, metric: str, baseline: dict, current: dict, threshold: float) -> Optional[MetricCheck]:
    base, cur = _normalised(baseline, metric), _normalised(current, metric)
    if not base or not cur:
        return None
    base_median, cur_median = statistics.median(base), statistics.median(cur)
    median_ratio, min_ratio = cur_median / base_median, min(cur) / min(base)
    raw_base, raw_cur = statistics.median(baseline["samples"][metric]), statistics.median(current["samples"][metric])
    raw_ratio = raw_cur / raw_base if raw_base else float("nan")
    slower_share = sum(v > base_median * (1 + threshold) for v in cur) / len(cur)
    decision = decide(base, cur, threshold)
    verdict = decision.verdict
    robust = median_ratio > 1 + threshold and min_ratio > 1 + threshold and slower_share > 0.5
    if verdict == "REGRESSED" and not robust:
        verdict = "INCONCLUSIVE"  # the mean moved but the median, the minimum or most repetitions did not
    needed = decision.repetitions_needed if verdict == "INCONCLUSIVE" else None
    reason = decision.reason or ("the mean is slower beyond noise but the median/min/majority rule disagrees"
                                 if verdict == "INCONCLUSIVE" else "")
    if verdict == "INCONCLUSIVE" and needed is None:
        needed = max(len(base), len(cur)) * 2
    return MetricCheck(key, metric, base_median, cur_median, median_ratio, min_ratio, raw_ratio, slower_share, verdict,
                       decision.noise, needed, reason)


def _indexed(document: dict, where: str, ok_only: bool) -> Dict[str, dict]:
    results = document.get("results")
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise SfedgeError(f"{where}'results' is not a list of result records")
    records = [r for r in results if r.get("status") == "ok" or not ok_only]
    identities: Dict[str, List[dict]] = {}
    for record in records:
        identities.setdefault(case_identity(record, where), []).append(record)
    indexed = {}
    for identity, group in identities.items():  # the same model twice (two copies of an export): tell them apart
        for record in group:
            indexed[identity if len(group) == 1 else f"{identity} @{record.get('source', '?')}"] = record
    return indexed


def check_baseline(document: dict, path: str) -> None:
    """Before the run: every successful result has an identity, and there is at least one."""
    if not _indexed(document, f"baseline {path}: ", ok_only=True):
        raise SfedgeError(f"baseline {path} has no successful results: nothing to gate against "
                          "(re-save it with `sfedge bench ... --save-baseline FILE`)")


def compare(baseline: dict, current: dict, threshold: float, metrics: Sequence[str] = GATE_METRICS,
            allow_missing: bool = False, allow_inconclusive: bool = False) -> GateReport:
    report = GateReport(threshold, allow_missing, allow_inconclusive)
    reference = _indexed(baseline, "baseline: ", ok_only=True)
    results = current.get("results") if isinstance(current.get("results"), list) else []
    report.unusable += [r.get("key", "?") for r in results if r.get("status") != "ok"]
    runs = _indexed(current, "current run: ", ok_only=True)
    for identity, record in runs.items():
        key = record.get("key", identity)
        if identity not in reference:
            report.not_in_baseline.append(f"{key} [{identity}]")
            continue
        checks = [check_metric(key, metric, reference[identity], record, threshold) for metric in metrics]
        if not any(checks):
            report.unusable.append(key)
        report.checks += [c for c in checks if c]
    failed_cases = {r.get("key") for r in results if r.get("status") != "ok"}
    report.not_run += [f"{record.get('key', identity)} [{identity}]" for identity, record in reference.items()
                       if identity not in runs and record.get("key") not in failed_cases]
    return report
