"""Mean +- stddev, p50 / p90, min / max of raw samples (the samples themselves are kept too)."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Sequence[float]) -> Dict[str, float]:
    n = len(values)
    if not n:
        return {"n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"n": n, "mean": mean, "std": std, "p50": percentile(values, 50), "p90": percentile(values, 90),
            "min": min(values), "max": max(values)}


def summarize_all(samples: Dict[str, List[float]]) -> Dict[str, Dict[str, float]]:
    return {name: summarize(values) for name, values in samples.items()}
