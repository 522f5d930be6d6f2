"""One result document, four printers: md (default; constant columns go above the table), csv
(flat, every column), json (the whole document, raw samples included), jsonl (one record a line)."""
from __future__ import annotations

import csv
import io
import json
from typing import Callable, Dict, List

from sfedge.registry import Registry

Printer = Callable[[dict], str]
PRINTERS: Registry[Printer] = Registry("output format")

# (column, header, record -> value): what a case is
CONFIG_COLUMNS = [
    ("source", "source", lambda r: r.get("source")),
    ("backend", "backend", lambda r: r.get("model", {}).get("backend")),
    ("recipe", "recipe", lambda r: r.get("model", {}).get("recipe")),
    ("preset", "model", lambda r: r.get("model", {}).get("preset")),
    ("name", "case", lambda r: r.get("name")),
    ("frames", "frames", lambda r: r.get("frames")),
    ("slowfast", "slowfast", lambda r: r.get("model", {}).get("slowfast")),
    ("visual_tokens", "visual tok", lambda r: r.get("visual_tokens")),
    ("text_tokens", "text tok", lambda r: r.get("text_tokens")),
    ("num_prompt_tokens", "prompt tok", lambda r: r.get("num_prompt_tokens")),
    ("num_generated_tokens", "gen tok", lambda r: r.get("num_generated_tokens")),
    ("threads", "threads", lambda r: r.get("threads")),
    ("repetitions", "reps", lambda r: r.get("case", {}).get("repetitions")),
]
# (metric, header, digits) shown as mean +- stddev in md; mean / std / p50 / p90 / min in csv
METRIC_COLUMNS = [
    ("ttft_ms", "TTFT ms", 1), ("video_decode_ms", "video ms", 1), ("preprocess_ms", "preproc ms", 1),
    ("vision_encode_ms", "encode ms", 1), ("vision_encode_ms_per_frame", "enc/frame ms", 2),
    ("projector_ms", "proj ms", 2), ("embed_ms", "embed ms", 2), ("prefill_ms", "prefill ms", 1),
    ("prefill_tokens_per_s", "pp tok/s", 0), ("decode_tokens_per_s", "tg tok/s", 1),
    # video chat (--questions, --realtime): shown only when a record has them
    ("q2_ttft_ms", "Q2 TTFT ms", 1), ("q3_ttft_ms", "Q3 TTFT ms", 1), ("q2_decode_tokens_per_s", "Q2 tg tok/s", 1),
    ("rt_lag_ms", "RT lag ms", 1),
]
# (column, header, record -> value, format)
EXTRA_COLUMNS = [
    ("model_load_ms", "load ms", lambda r: r.get("model_load_ms"), "{:.0f}"),
    ("peak_rss_mib", "peak RSS MiB", lambda r: r.get("peak_rss_bytes", 0) / 2**20 if r.get("peak_rss_bytes") else None, "{:.0f}"),
    ("artifact_mib", "size MiB", lambda r: r.get("artifact_bytes", {}).get("total", 0) / 2**20 or None, "{:.2f}"),
    ("decode_bandwidth_share", "tg % BW", lambda r: _pct(r, "decode_bandwidth_share"), "{:.1f}"),
    ("prefill_flop_share", "pp % FLOP", lambda r: _pct(r, "prefill_flop_share"), "{:.1f}"),
    ("encode_flop_share", "enc % FLOP", lambda r: _pct(r, "encode_flop_share"), "{:.1f}"),
]
PROVENANCE_COLUMNS = [
    ("sfedge_version", "sfedge", lambda p: p.get("sfedge_version")),
    ("git_commit", "commit", lambda p: p.get("git_commit")),
    ("cpu", "CPU", lambda p: p.get("cpu")),
    ("cpu_flags", "CPU flags", lambda p: " ".join(p.get("cpu_flags", []))),
    ("libraries", "libraries", lambda p: " ".join(f"{k}={v}" for k, v in sorted(p.get("libraries", {}).items()))),
]


def probe_note(limit: dict) -> str:
    """' (probe 1200 MiB, LLC 300 MiB)': what the bandwidth probe streamed, against the cache it had to beat."""
    if not limit.get("probe_bytes"):
        return ""
    llc = f", LLC {limit['llc_bytes'] / 2**20:.0f} MiB" if limit.get("llc_bytes") else ", LLC unknown"
    return f" (probe {limit['probe_bytes'] / 2**20:.0f} MiB{llc})"


def _pct(record: dict, key: str):
    value = record.get("roofline", {}).get(key)
    return value * 100 if value is not None else None


def flat_row(record: dict) -> Dict[str, object]:
    """Every column of a record as scalars (the csv row)."""
    row: Dict[str, object] = {key: get(record) for key, _, get in CONFIG_COLUMNS}
    row["status"] = record.get("status")
    row["note"] = record.get("note", "")
    for metric, _, _ in METRIC_COLUMNS:
        stats = record.get("metrics", {}).get(metric, {})
        for field in ("mean", "std", "p50", "p90", "min"):
            row[f"{metric}_{field}"] = stats.get(field)
    for key, _, get, _ in EXTRA_COLUMNS:
        row[key] = get(record)
    for stage, value in record.get("rss_bytes", {}).items():  # high-water mark at the end of each stage
        row[f"rss_{stage}_bytes"] = value
    prov = record.get("provenance", {})
    for key, _, get in PROVENANCE_COLUMNS:
        row[key] = get(prov)
    return row


@PRINTERS.register("csv")
def print_csv(document: dict) -> str:
    rows = [flat_row(r) for r in document["results"]]
    buffer = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row)) or ["status"]  # failed rows have fewer keys
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@PRINTERS.register("json")
def print_json(document: dict) -> str:
    return json.dumps(document, indent=2) + "\n"


@PRINTERS.register("jsonl")
def print_jsonl(document: dict) -> str:
    return "".join(json.dumps(record) + "\n" for record in document["results"])


def _fmt(value, spec: str = "{}") -> str:
    if value is None or value == "":
        return ""
    return spec.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


@PRINTERS.register("md")
def print_markdown(document: dict) -> str:
    results = document["results"]
    ok = [r for r in results if r.get("status") == "ok"]
    lines: List[str] = []
    constant: List[str] = []
    headers: List[str] = []
    cells: List[List[str]] = [[] for _ in ok]
    for key, header, get in CONFIG_COLUMNS:
        values = [_fmt(get(r)) for r in ok]
        if len(set(values)) > 1 or key in ("source", "name"):
            headers.append(header)
            for row, value in zip(cells, values):
                row.append(value)
        elif values and values[0]:
            constant.append(f"{header}: {values[0]}")
    for metric, header, digits in METRIC_COLUMNS:
        stats = [r["metrics"].get(metric, {}) for r in ok]
        if not any(s.get("mean") for s in stats):
            continue
        headers.append(header)
        for row, s in zip(cells, stats):
            row.append(f"{s['mean']:.{digits}f} ± {s.get('std', 0.0):.{digits}f}" if "mean" in s else "")
    for key, header, get, spec in EXTRA_COLUMNS:
        values = [get(r) for r in ok]
        if not any(v for v in values):
            continue
        headers.append(header)
        for row, value in zip(cells, values):
            row.append(_fmt(value, spec))
    prov = document.get("provenance", {})
    constant += [f"{header}: {get(prov)}" for _, header, get in PROVENANCE_COLUMNS if get(prov)]
    for threads, limit in sorted(document.get("limits", {}).items()):
        if threads == str(limit.get("threads")):
            constant.append(f"limits ({threads} thread(s)): read {limit['read_gb_s']:.1f} GB/s, copy {limit['copy_gb_s']:.1f} GB/s, "
                            f"fp32 matmul {limit['matmul_gflop_s']:.0f} GFLOP/s{probe_note(limit)}")
    lines += [f"- {item}" for item in constant]
    if ok:
        lines += ["", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
    failed = [r for r in results if r.get("status") != "ok"]
    if failed or document.get("notes"):
        lines.append("")
    lines += [f"- FAILED {r.get('key')}: {r.get('note')}" for r in failed]
    lines += [f"- note: {note}" for note in document.get("notes", [])]
    return "\n".join(lines) + "\n"


def render(document: dict, output: str) -> str:
    return PRINTERS.get(output)(document)
