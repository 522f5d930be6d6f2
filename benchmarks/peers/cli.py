"""``python -m sfedge.benchmarks.peers``: run ours and a peer alternately in fresh workers, pool the
repetitions of every round, print one table per prompt length with the provenance above it."""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from sfedge.benchmarks.peers import PEER_NAMES
from sfedge.errors import SfedgeError, UsageError

OURS = "llm"
_NATIVE_LOG = re.compile(r"^(\[\w+\.(cpp|h):\d+\]|[IWE]\d{4} |[IWE] |\.+$)")  # [op.cpp:12] ..., glog/absl, tokenizers, llama.cpp's load dots


def _quiet_progress(line: str) -> None:
    """Forward the worker's own lines; drop the C++ libraries' log lines."""
    if not _NATIVE_LOG.match(line):
        print(line, file=sys.stderr)


# --- what each peer needs before the rounds: job overlays, one per variant (llama.cpp: per quant type) ----

def _plain(args, job: dict, progress) -> List[dict]:
    return [{}]


def _executorch_runner(args, job: dict, progress) -> List[dict]:
    from sfedge.benchmarks.peers.executorch_runner import check_job

    for prompt in args.prompt_tokens:
        check_job({**job, "prompt_tokens": prompt})
    return [{}]


def _llamacpp(args, job: dict, progress) -> List[dict]:
    from sfedge.benchmarks.peers.llamacpp import default_gguf_root, variants

    return variants(job, args.quant, args.gguf_dir or str(default_gguf_root()), progress)


PEER_SETUP: Dict[str, Callable] = {"transformers": _plain, "executorch-runner": _executorch_runner, "llama.cpp": _llamacpp}


# --- pooling the rounds -------------------------------------------------------------------------------

def pool(results: List[dict]) -> dict:
    """One side's results of every round -> one result: samples concatenated, summaries recomputed,
    the highest peak RSS, the mean load time, and each round's means kept."""
    from sfedge.benchmarks.summary import summarize_all

    samples: Dict[str, list] = {}
    for result in results:
        for metric, values in result["samples"].items():
            samples.setdefault(metric, []).extend(values)
    first = results[0]
    return {**{k: v for k, v in first.items() if k not in ("samples", "metrics")},
            "samples": samples, "metrics": summarize_all(samples),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
            "model_load_ms": sum(r["model_load_ms"] for r in results) / len(results),
            "round_means": [{m: s["mean"] for m, s in r["metrics"].items() if "mean" in s} for r in results]}


def check_result(kind: str, result: dict) -> dict:
    if kind.startswith("llama.cpp"):
        from sfedge.benchmarks.peers.llamacpp import check_worker_result

        return check_worker_result(result, kind)
    if result.get("status") == "failed":
        raise SfedgeError(f"{kind}: {result['note']}")
    return result


def run_rounds(job: dict, sides: List[Tuple[str, str, dict]], rounds: int, progress) -> Dict[str, dict]:
    """sides: (key, worker kind, job overlay). Runs A, B, ..., A, B, ... ``rounds`` times."""
    from sfedge.benchmarks.runner import spawn_worker

    collected: Dict[str, List[dict]] = {key: [] for key, _, _ in sides}
    for round_index in range(rounds):
        for key, kind, overlay in sides:
            progress(f"round {round_index + 1}/{rounds}, {key}: prompt {job['prompt_tokens']}, warm-up {job['warmup']} + "
                     f"{job['repetitions']} repetitions ...")
            collected[key].append(check_result(kind, spawn_worker({**job, **overlay, "kind": kind}, progress=_quiet_progress)))
    return {key: pool(results) for key, results in collected.items()}


# --- printing ---------------------------------------------------------------------------------------

def _stat(result: dict, metric: str, digits: int = 1) -> str:
    s = result["metrics"][metric]
    return f"{s['mean']:,.{digits}f} ± {s['std']:,.{digits}f}"


def format_table(results: Dict[str, dict], prompt: int, gen: int) -> str:
    keys = list(results)
    ours = results.get(OURS)
    peers = [k for k in keys if k != OURS]
    mean = lambda key, metric: results[key]["metrics"][metric]["mean"]  # noqa: E731
    header = [f"prompt {prompt}, gen {gen}"] + [results[k]["name"] for k in keys]
    if ours:
        header += [f"ours / {results[k]['name']}" for k in peers]
    rates = [("prefill, tok/s", "prefill_tokens_per_s", 1), (f"decode after {prompt} tok, tok/s", "decode_tokens_per_s", 2)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, metric, digits in rates:  # ratio > 1: ours is faster
        cells = [_stat(results[k], metric, digits) for k in keys]
        if ours:
            cells += [f"{mean(OURS, metric) / mean(k, metric):.2f}x" if mean(k, metric) else "" for k in peers]
        lines.append("| " + " | ".join([label] + cells) + " |")
    extra = [("prefill, ms", lambda r: r["metrics"]["prefill_ms"]["mean"], "{:,.1f}"),
             ("peak RSS, MiB", lambda r: r["peak_rss_bytes"] / 2**20, "{:,.0f}"), ("load, ms", lambda r: r["model_load_ms"], "{:,.0f}"),
             ("model file, MiB", lambda r: r["model_bytes"] / 2**20 if r.get("model_bytes") else None, "{:,.1f}")]
    for label, get, spec in extra:
        values = [get(results[k]) for k in keys]
        if any(v is not None for v in values):
            cells = ["" if v is None else spec.format(v) for v in values] + ([""] * len(peers) if ours else [])
            lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def header_lines(prov: dict, job: dict, rounds: int, results: Dict[str, dict]) -> List[str]:
    lines = [f"- CPU: {prov['cpu']} ({prov['cpu_count']} logical)", f"- CPU flags: {' '.join(prov['cpu_flags']) or 'unknown'}",
             f"- threads: {', '.join(sorted({str(r.get('threads')) for r in results.values()}))}",
             f"- rounds: {rounds} x (warm-up {job['warmup']} + {job['repetitions']} repetitions), alternating, each side in a fresh process",
             f"- sfedge {prov['sfedge_version']} {prov['git_commit']}; "
             + " ".join(f"{k}={v}" for k, v in sorted(prov["libraries"].items()))]
    for result in results.values():
        lines += [f"- {result['name']}: {note}" for note in result.get("notes", [])]
    return lines


# --- command line -----------------------------------------------------------------------------------

def _int_list(text: str) -> List[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def build_parser() -> argparse.ArgumentParser:
    from sfedge.benchmarks.peers import __doc__ as doc

    parser = argparse.ArgumentParser(prog="python -m sfedge.benchmarks.peers", description=doc.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="?", metavar="DIR", help="artifact folder (default: the eager model of --model)")
    parser.add_argument("--model", default="tiny", help="preset whose LLM shape both sides use without DIR (default: tiny)")
    parser.add_argument("--backend", help="with DIR: run this backend on it, e.g. eager")
    parser.add_argument("--peer", choices=PEER_NAMES, default="transformers", help="what to compare with")
    parser.add_argument("--quant", type=lambda s: [q.strip().upper() for q in s.split(",") if q.strip()], default=["Q4_0"],
                        help="llama.cpp: GGUF types, comma-separated (Q4_0, Q8_0, F16, F32; default Q4_0)")
    parser.add_argument("--gguf-dir", help="llama.cpp: where the GGUF files are cached (default ~/.cache/sfedge/gguf)")
    parser.add_argument("--no-ours", action="store_true", help="time the peer alone (no export folder needed)")
    parser.add_argument("--prompt-tokens", type=_int_list, default=[128], help="comma-separated, one table each")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int)
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="per worker (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="per worker (default 1)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of every side (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sfedge.benchmarks.cases import Source
    from sfedge.benchmarks.provenance import provenance

    args = build_parser().parse_args(argv)
    progress = _quiet_progress
    try:
        if min(args.prompt_tokens) < 1 or args.gen_tokens < 2 or args.repetitions < 1 or args.rounds < 1:
            raise UsageError("--prompt-tokens >= 1, --gen-tokens >= 2, --repetitions >= 1 and --rounds >= 1 are required")
        source = Source(folder=args.artifacts, backend=args.backend) if args.artifacts else Source(preset=args.model)
        job = {"source": source.__dict__, "gen_tokens": args.gen_tokens, "threads": args.threads,
               "repetitions": args.repetitions, "warmup": args.warmup, "seed": args.seed, "verify": True,
               "prompt_tokens": args.prompt_tokens[0]}
        overlays = PEER_SETUP[args.peer](args, job, progress)
        sides = [] if args.no_ours else [(OURS, OURS, {})]
        sides += [(" ".join(filter(None, [args.peer, overlay.get("quant")])), args.peer, overlay) for overlay in overlays]
        tables = {prompt: run_rounds({**job, "prompt_tokens": prompt}, sides, args.rounds, progress)
                  for prompt in args.prompt_tokens}
    except SfedgeError as exc:
        print(f"peers: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    prov = provenance()
    first = next(iter(tables.values()))
    print("\n".join(header_lines(prov, job, args.rounds, first)))
    for prompt, results in tables.items():
        print()
        print(format_table(results, prompt, args.gen_tokens))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"job": job, "argv": list(argv) if argv is not None else sys.argv[1:], "provenance": prov,
                       "rounds": args.rounds, "tables": {str(p): r for p, r in tables.items()}}, handle, indent=2)
    return 0
