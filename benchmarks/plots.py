"""PNG plots (matplotlib, Agg backend): the TTFT breakdown per case, peak memory vs frames, and
visual tokens vs frames against the context limit (pure token arithmetic, no model run)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Sequence, Tuple

from sfedge.config import ModelConfig
from sfedge.errors import SfedgeError

TTFT_STAGES = [("video_decode_ms", "video decode"), ("preprocess_ms", "preprocess"), ("vision_encode_ms", "vision encode"),
               ("projector_ms", "projector"), ("embed_ms", "embed"), ("prefill_ms", "prefill"),
               ("ttft_other_ms", "tokenize + splice + sample")]
FRAME_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise SfedgeError("plots need matplotlib: pip install 'sfedge[bench]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")


def plot_ttft_breakdown(records: Sequence[dict], path: Path) -> Path:
    plt = _pyplot()
    labels = [r["key"] for r in records]
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.45 * len(records)))
    left = [0.0] * len(records)
    for metric, label in TTFT_STAGES:
        widths = [max(r["metrics"].get(metric, {}).get("mean", 0.0), 0.0) for r in records]
        ax.barh(labels, widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("time to first token, ms (mean); video in -> first token")
    ax.set_title("TTFT by stage")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series_label(record: dict) -> str:
    rest = "+".join(part for part in record["name"].split("+") if not re.fullmatch(r"f\d+|f\*", part))
    return f"{record['source']} {rest}".strip()


def plot_memory_vs_frames(records: Sequence[dict], path: Path) -> Path:
    plt = _pyplot()
    series: dict = {}
    for r in records:
        series.setdefault(_series_label(r), []).append((r["frames"], r["peak_rss_bytes"] / 2**20))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(_plain_ticks())
    ax.set_xlabel("frames sampled")
    ax.set_ylabel("process peak RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.set_title("Peak memory vs frames (one fresh process per case)")
    return _finish(plt, fig, ax, path)


def _finish(plt, fig, ax, path: Path) -> Path:
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_visual_tokens(models: Sequence[Tuple[str, ModelConfig, int]], frames: Sequence[int], path: Path) -> Path:
    """models: (label, config, context limit); frames: the swept values (added to a log grid)."""
    from sfedge.budget import compute_budget

    plt = _pyplot()
    grid = sorted(set(FRAME_GRID) | {f for f in frames if f})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves: dict = {}  # models with the same vision grid and SlowFast spec share one curve
    contexts: dict = {}
    for label, config, context in models:
        key = (config.vision.grid, config.slowfast.spec)
        curves.setdefault(key, (config, []))[1].append(label)
        contexts.setdefault(context, []).append(label)
    for config, labels in curves.values():
        tokens = [compute_budget(config, 0, frames=f).visual_tokens for f in grid]
        ax.plot(grid, tokens, marker=".", label=f"{', '.join(dict.fromkeys(labels))}: {config.slowfast.spec}")
    for context, labels in contexts.items():
        ax.axhline(context, linestyle="--", color="gray")
        ax.text(grid[0], context * 1.05, f"context {context:,} ({', '.join(dict.fromkeys(labels))})", fontsize=7, color="gray")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(_plain_ticks())
    ax.set_yscale("log")
    ax.set_xlabel("frames sampled")
    ax.set_ylabel("visual tokens")
    ax.set_title("Visual tokens vs frames against the context limit")
    return _finish(plt, fig, ax, path)


def budget_models(sources, slowfast_specs: Sequence) -> List[Tuple[str, ModelConfig, int]]:
    """(label, config, context) for every model in the sweep, from presets or artifact manifests."""
    from sfedge.config import get_preset
    from sfedge.manifest import read_manifest

    models = []
    for source in sources:
        if source.folder:
            manifest = read_manifest(source.folder)
            config = ModelConfig.from_dict(manifest.model_config)
            models.append((source.label, config, int(manifest.export_options.get("max_context") or config.llm.max_context)))
        else:
            for spec in slowfast_specs:
                config = get_preset(source.preset).with_slowfast(None, spec)
                models.append((source.label, config, config.llm.max_context))
    return models


def write_plots(document: dict, folder: Path, models, frames: Sequence[int]) -> List[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [plot_visual_tokens(models, frames, folder / "visual_tokens_vs_frames.png")]
    ok = [r for r in document.get("results", []) if r.get("status") == "ok"]
    if ok:
        written.append(plot_ttft_breakdown(ok, folder / "ttft_breakdown.png"))
        written.append(plot_memory_vs_frames(ok, folder / "memory_vs_frames.png"))
    return written
