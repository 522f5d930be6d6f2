"""`sfedge plan`: which frame counts and SlowFast specs (and backends/recipes, one per profile) fit a
TTFT and a memory budget on the profiled machine, ranked by visual tokens; and a plot of predicted
TTFT vs frames per profile with the measured points. Pure arithmetic over device profiles: no model
is loaded and torch is not imported (matplotlib only for the plot)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from sfedge.benchmarks.costmodel import DeviceProfile, Prediction, predict
from sfedge.errors import UsageError

FRAME_CANDIDATES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
# SF-LLaVA-1.5's spec first, then the v1 specs of the paper's ablations
SPEC_CANDIDATES = (
    "slowfast-slow_32frms_spatial_2d_avg_pool-fast_6x6",
    "slowfast-slow_10frms_spatial_1d_max_pool-fast_4x4",
    "slowfast-slow_10frms_spatial_1d_max_pool-fast_6x6",
    "slowfast-slow_16frms_spatial_2d_avg_pool-fast_4x4",
    "slowfast-slow_8frms_spatial_2d_avg_pool-fast_2x2",
)
UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_duration_ms(text: str, flag: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|min)?\s*", text or "")
    if not match:
        raise UsageError(f"{flag} takes a duration such as 10s, 800ms or 2min; got {text!r}")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"ms": 1.0, "s": 1e3, "min": 6e4}[unit]


def parse_bytes(text: str, flag: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not match or match.group(2).lower() not in UNITS:
        raise UsageError(f"{flag} takes a size such as 3GiB, 800MiB or 2GB; got {text!r}")
    return float(match.group(1)) * UNITS[match.group(2).lower()]


@dataclass(frozen=True)
class Candidate:
    profile_path: str
    prediction: Prediction
    fits: bool
    reason: str  # why it does not fit ("" when it does)


def candidates(profiles: Sequence[tuple], max_ttft_ms: float, max_rss_bytes: float, frames: Sequence[int] = FRAME_CANDIDATES,
               specs: Optional[Sequence[str]] = None, gen_tokens: int = 32) -> List[Candidate]:
    """Every (profile, spec, frames) the preset accepts, predicted and checked against the budget;
    ranked: fitting first, then by visual tokens (most first), then by TTFT (fastest first)."""
    from sfedge.budget import visual_token_counts
    from sfedge.config import get_preset

    out: List[Candidate] = []
    for path, profile in profiles:
        preset = get_preset(profile.model.preset)
        for spec in _specs(profile, specs):
            for count in frames:
                try:
                    config = preset.with_slowfast(count, spec)
                except UsageError:  # a spec that does not fit this preset's patch grid
                    continue
                _, slow, fast = visual_token_counts(config, count)
                prediction = predict(profile, count, slow + fast, config.slowfast.spec, gen_tokens=gen_tokens)
                reasons = []
                if prediction.ttft_ms > max_ttft_ms:
                    reasons.append(f"TTFT {prediction.ttft_ms / 1e3:.1f} s")
                if prediction.peak_rss_bytes > max_rss_bytes:
                    reasons.append(f"RSS {prediction.peak_rss_bytes / 2**30:.2f} GiB")
                if prediction.prompt_tokens + gen_tokens > preset.llm.max_context:
                    reasons.append("context")
                out.append(Candidate(path, prediction, not reasons, ", ".join(reasons)))
    out.sort(key=lambda c: (not c.fits, -c.prediction.visual_tokens, c.prediction.ttft_ms))
    return out


def _specs(profile: DeviceProfile, specs: Optional[Sequence[str]]) -> List[str]:
    return list(dict.fromkeys(specs or (profile.model.slowfast, *SPEC_CANDIDATES)))


def format_plan(ranked: Sequence[Candidate], max_ttft_ms: float, max_rss_bytes: float, show_all: bool = False) -> str:
    fitting = [c for c in ranked if c.fits]
    lines = [f"{len(fitting)} of {len(ranked)} candidates fit TTFT <= {max_ttft_ms / 1e3:g} s and peak RSS <= "
             f"{max_rss_bytes / 2**30:.2f} GiB (ranked by visual tokens; * = extrapolated past the profile)",
             "| profile | backend | recipe | frames | slowfast | visual tokens | TTFT s | decode tok/s | peak RSS GiB | fits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in (ranked if show_all else fitting):
        p = c.prediction
        mark = "*" if p.extrapolated else ""
        lines.append(f"| {c.profile_path} | {p.backend} | {p.recipe} | {p.frames}{mark} | {p.slowfast} | {p.visual_tokens:,} | "
                     f"{p.ttft_ms / 1e3:.2f}{mark} | {p.decode_tokens_per_s:.1f} | {p.peak_rss_bytes / 2**30:.2f} | "
                     f"{'yes' if c.fits else 'no: ' + c.reason} |")
    if not fitting and not show_all:
        lines.append("(none fits: pass --all to see every candidate and why)")
    return "\n".join(lines)


def write_plot(path: Path, profiles: Sequence[tuple], max_ttft_ms: float, frames: Sequence[int] = FRAME_CANDIDATES) -> Path:
    """Predicted TTFT vs frames (each profile at its own SlowFast spec), the measured points on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sfedge.budget import visual_token_counts
    from sfedge.config import get_preset

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, profile in profiles:
        config = get_preset(profile.model.preset)
        xs = sorted(set(frames) | set(profile.frames))
        ys = []
        for count in xs:
            _, slow, fast = visual_token_counts(config.with_slowfast(count, profile.model.slowfast), count)
            ys.append(predict(profile, count, slow + fast, profile.model.slowfast).ttft_ms / 1e3)
        name = f"{profile.model.backend} {profile.model.recipe} ({Path(label).stem})"
        line, = ax.plot(xs, ys, label=f"{name}: predicted")
        measured = [(row["frames"], _measured_ttft_s(row)) for row in profile.measured]
        if measured:
            ax.scatter([m[0] for m in measured], [m[1] for m in measured], color=line.get_color(), marker="o", zorder=3,
                       label=f"{name}: measured (profile)")
        ax.axvspan(min(profile.frames), max(profile.frames), color=line.get_color(), alpha=0.06)
    ax.axhline(max_ttft_ms / 1e3, color="gray", linestyle="--", label="--max-ttft")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("frames (shaded: profiled range; outside it is extrapolated)")
    ax.set_ylabel("TTFT (s)")
    ax.set_title("Predicted time to first token vs frames")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _measured_ttft_s(row: dict) -> float:
    """The profile's own stage timings at that frame count, summed like a TTFT (prefill to that context)."""
    stages = ("video_ms", "vision_encode_ms", "projector_ms", "embed_ms", "prefill_ms_to_here")
    return sum(float(row.get(name, 0.0)) for name in stages) / 1e3
