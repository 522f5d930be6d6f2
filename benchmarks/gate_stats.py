"""The latency gate's noise arithmetic: is a slowdown beyond the threshold, below it, or undecided?

Samples are normalised (sample / calibration ms) and compared on the log scale, where a ratio of
1.10 is +0.095 whatever the case's size. With n_b baseline and n_c current repetitions and the
coefficient of variation (CV) of each side, the standard error of the log ratio of the two means
is se = sqrt(cv_b^2 / n_b + cv_c^2 / n_c) (a side with one repetition borrows the other's CV;
with one repetition on both sides the noise is unknown).

With d = log(1 + threshold) and L = the log ratio of the means:
- REGRESSED  when L - k_fail * se > d: slower than the threshold beyond doubt. k_fail is Student's
             t at one-sided 99.99 % for the pooled degrees of freedom, and the median, minimum and
             majority must agree (gate.py), so two runs of the same code practically never fail
             however few the repetitions (tests/test_gate.py checks it over thousands of synthetic
             runs); the price: with 3 repetitions only a slowdown of about 2x is decided as such;
- ok         when L + k_pass * se <= d: any slowdown is below the threshold (k_pass = 2, ~98 %);
- INCONCLUSIVE otherwise: the noise band straddles the threshold. Instead of flipping between
  ok and REGRESSED from run to run, the gate says so and estimates the repetitions per side that
  would decide: the smallest n with k * sqrt((cv_b^2 + cv_c^2) / n) < |d - L|.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

K_PASS = 2.0
MAX_REPETITIONS = 1000  # beyond this the estimate is reported as "more than"
# one-sided 99.99 % quantiles of Student's t by degrees of freedom (scipy.stats.t.ppf(0.9999, df)); 99.9 %
# let 2 of 600 same-code comparisons fail at r=3 and 40 % noise (a CV from 3 samples is often far too small)
_T_9999 = {1: 3183.1, 2: 70.70, 3: 22.20, 4: 13.03, 5: 9.678, 6: 8.025, 7: 7.063, 8: 6.442, 9: 6.010, 10: 5.694,
          12: 5.263, 15: 4.880, 20: 4.538, 30: 4.234, 60: 3.962, 120: 3.837}
_NORMAL_9999 = 3.719


def k_fail(degrees_of_freedom: int) -> float:
    """The t quantile (99.99 %) of the largest tabulated df <= the given one (conservative between entries)."""
    if degrees_of_freedom < 1:
        return math.inf
    if degrees_of_freedom > max(_T_9999):
        return _NORMAL_9999
    return _T_9999[max(df for df in _T_9999 if df <= degrees_of_freedom)]


def repetitions_needed(variance_sum: float, gap: float, failing: bool, start: int) -> int:
    """Smallest n per side (from ``start``) whose band k * sqrt(variance_sum / n) fits inside ``gap``."""
    for n in range(max(start, 2), MAX_REPETITIONS + 1):
        k = k_fail(2 * n - 2) if failing else K_PASS
        if k * math.sqrt(variance_sum / n) < gap:
            return n
    return MAX_REPETITIONS + 1


def coefficient_of_variation(samples: Sequence[float]) -> Optional[float]:
    """The spread as a coefficient of variation: the stdev of log x (~ stdev / mean); None under 2 samples."""
    if len(samples) < 2:
        return None
    return statistics.stdev(math.log(value) for value in samples)


@dataclass(frozen=True)
class Decision:
    verdict: str  # "ok", "REGRESSED" or "INCONCLUSIVE"
    log_ratio: float  # log(mean of current / mean of baseline), on log samples
    noise: Optional[float]  # the larger CV of the two sides (None: unknown)
    standard_error: Optional[float]
    low: float  # the ratio's band: exp(L - k_fail se) .. exp(L + k_pass se)
    high: float
    repetitions_needed: Optional[int]  # per side, when INCONCLUSIVE
    reason: str = ""


def decide(baseline: Sequence[float], current: Sequence[float], threshold: float) -> Decision:
    """Positive normalised samples of one metric on both sides -> the verdict for ``threshold``."""
    limit = math.log1p(threshold)
    log_b, log_c = [math.log(v) for v in baseline], [math.log(v) for v in current]
    log_ratio = statistics.fmean(log_c) - statistics.fmean(log_b)
    cv_b, cv_c = coefficient_of_variation(baseline), coefficient_of_variation(current)
    if cv_b is None and cv_c is None:
        return Decision("INCONCLUSIVE", log_ratio, None, None, 0.0, math.inf, 2,
                        "one repetition on each side: the noise cannot be measured (use -r 2 or more)")
    cv_b = cv_c if cv_b is None else cv_b
    cv_c = cv_b if cv_c is None else cv_c
    se = math.sqrt(cv_b ** 2 / len(baseline) + cv_c ** 2 / len(current))
    k = k_fail(len(baseline) + len(current) - 2)
    low, high = math.exp(log_ratio - k * se), math.exp(log_ratio + K_PASS * se)
    noise = max(cv_b, cv_c)
    if log_ratio - k * se > limit:
        return Decision("REGRESSED", log_ratio, noise, se, low, high, None)
    if log_ratio + K_PASS * se <= limit:
        return Decision("ok", log_ratio, noise, se, low, high, None)
    needed = repetitions_needed(cv_b ** 2 + cv_c ** 2, abs(limit - log_ratio), log_ratio > limit,
                                max(len(baseline), len(current)) + 1)
    return Decision("INCONCLUSIVE", log_ratio, noise, se, low, high, needed,
                    f"noise {noise:.1%} per repetition: the ratio is between {low:.2f} and {high:.2f}")
