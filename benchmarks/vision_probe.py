"""Vision encoder alone: eager fp32 vs ExecuTorch .pte variants (scheme x batch x graph), alternating rounds.

    python -m sfedge.benchmarks.vision_probe --model sf-llava-1.5-1b --out /work/scratch/vision \\
        --variants sdpa/8da8w/1,8da8w/1,int8-static/1,fp16/1,8da8w/2 --rounds 3 --threads 2

A variant is ``[sdpa/]SCHEME/BATCH``: the ``sdpa/`` prefix traces the eager graph (F.scaled_dot_product_attention
and nn.LayerNorm, what the exporter traced before the explicit export graph); without it the exporter's graph.
Each .pte is exported once (in a subprocess, so the memory of one lowering is freed before the next; kept in
OUT and reused) from a vision encoder with random weights of the preset's true shape; then every round times
eager and every variant once each, in turn, on the same preprocessed frames, and reports s/frame (median over
rounds), the cosine of its features with eager fp32 and the ops left outside the delegate.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch

from sfedge.errors import UsageError


@dataclass(frozen=True)
class Variant:
    scheme: str
    batch: int
    sdpa: bool = False  # trace the eager graph (the exporter's graph before the explicit attention)

    @staticmethod
    def parse(text: str) -> "Variant":
        parts = text.split("/")
        sdpa = parts[0] == "sdpa"
        parts = parts[1:] if sdpa else parts
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) < 1:
            raise UsageError(f"--variants: {text!r} is not [sdpa/]SCHEME/BATCH (e.g. 8da8w/2)")
        return Variant(parts[0], int(parts[1]), sdpa)

    @property
    def label(self) -> str:
        return f"{'sdpa/' if self.sdpa else ''}{self.scheme}/{self.batch}"

    def file(self, out: Path) -> Path:
        return out / f"vision_{'sdpa_' if self.sdpa else ''}{self.scheme}_b{self.batch}.pte"


DEPTH = {"value": None}  # --depth: keep only the first N blocks (a quick proxy: the blocks are identical in cost)


def vision_config(model: str):
    import dataclasses

    from sfedge.config import get_preset

    vision = get_preset(model).vision
    return dataclasses.replace(vision, depth=DEPTH["value"]) if DEPTH["value"] else vision


def build_encoder(model: str, seed: int = 0):
    """The preset's vision encoder with seeded random weights (default nn init, position grid ~N(0, 0.02))."""
    from sfedge.models.vision import VisionEncoder

    torch.manual_seed(seed)
    encoder = VisionEncoder(vision_config(model))
    with torch.no_grad():
        encoder.pos_embed.normal_(0.0, 0.02)
    encoder.bake_position_embedding()
    return encoder.eval()


def export_variant(model: str, variant: Variant, path: Path) -> dict:
    """Trace + lower one variant to ``path``; returns the stage times and the ops left outside the delegate."""
    from sfedge.export.executorch import lower_checked
    from sfedge.export.executorch_vision import VISION_TRACERS, _export, trace_vision_encoder
    from sfedge.quantize.recipes import ComponentScheme

    encoder = build_encoder(model)
    scheme = ComponentScheme(variant.scheme, group_size=0)
    size = encoder.config.frame_size
    start = time.perf_counter()
    if variant.sdpa:  # the old path: torchao quantize, then the eager graph as is
        if variant.scheme not in ("fp32", "8da8w"):
            raise UsageError(f"--variants: the sdpa graph is only traced with fp32 / 8da8w, not {variant.scheme}")
        from sfedge.quantize.executorch import quantize_component
        quantize_component(encoder, "vision_encoder", scheme)
        program = _export(encoder, (torch.zeros(variant.batch, 3, size, size),))
    else:
        VISION_TRACERS.get(variant.scheme)
        program = trace_vision_encoder(encoder, scheme, variant.batch)
    traced = time.perf_counter()
    data, outside = lower_checked({"vision_encoder": program})
    path.write_bytes(data)
    return {"trace_s": round(traced - start, 1), "lower_s": round(time.perf_counter() - traced, 1),
            "outside": outside["vision_encoder"], "mib": round(len(data) / 2**20, 1)}


def _time(fn, batch: int) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / batch


def measure(model: str, variants: List[Variant], out: Path, rounds: int, threads: int) -> dict:
    import torch.nn.functional as F
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    from sfedge.export.executorch_vision import calibration_frames

    torch.set_num_threads(threads)
    encoder = build_encoder(model)
    vision = encoder.config
    frames = calibration_frames(vision.frame_size, max(v.batch for v in variants), vision.pixel_mean, vision.pixel_std, seed=1)
    with torch.no_grad():
        reference = encoder(frames[:1])
    programs = {v.label: _load_for_executorch(str(v.file(out))) for v in variants}
    runs = {"eager/fp32/1": lambda: encoder(frames[:1])}
    for v in variants:
        runs[v.label] = (lambda v=v: programs[v.label].run_method("vision_encoder", (frames[:v.batch],)))
    batches = {"eager/fp32/1": 1, **{v.label: v.batch for v in variants}}
    cosine = {}
    with torch.no_grad():
        for label, run in runs.items():  # warm-up + parity on frame 0
            features = run()
            features = features[0] if isinstance(features, (list, tuple)) else features
            cosine[label] = round(F.cosine_similarity(features[:1].flatten(1), reference.flatten(1)).item(), 5)
        times: Dict[str, list] = {label: [] for label in runs}
        for _ in range(rounds):
            for label, run in runs.items():
                times[label].append(_time(run, batches[label]))
    eager = statistics.median(times["eager/fp32/1"])
    return {label: {"s_per_frame": round(statistics.median(t), 3), "runs": [round(x, 3) for x in t],
                    "vs_eager": round(statistics.median(t) / eager, 2), "cosine": cosine[label]}
            for label, t in times.items()}


def profile_variants(model: str, variants: List[Variant], out: Path) -> str:
    """An ETDump per-operator table of one call of each variant (after a warm-up call), as `sfedge profile` prints."""
    import tempfile

    from sfedge.benchmarks.op_profile import CaseProfile, rows_from_events, table
    from sfedge.benchmarks.op_profile_backends import _etdump_events
    from sfedge.export.executorch_vision import calibration_frames

    vision = vision_config(model)
    profiles = []
    with tempfile.TemporaryDirectory(prefix="sfedge_vision_probe_") as scratch:
        for v in variants:
            path = v.file(out)
            frames = calibration_frames(vision.frame_size, v.batch, vision.pixel_mean, vision.pixel_std, seed=1)
            events, total = _etdump_events(path, "vision_encoder", (frames,), 2, Path(scratch))
            rows, by_where = rows_from_events(events, total)
            profiles.append(CaseProfile("vision_encoder", v.label, path.name, round(total, 3), by_where, rows))
    return table(profiles, top=12)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sfedge.benchmarks.vision_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sf-llava-1.5-1b")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .pte files and results.json")
    parser.add_argument("--variants", default="sdpa/8da8w/1,8da8w/1,int8-static/1,fp16/1,8da8w/2,int8-static/2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="then an ETDump per-operator table per variant (OUT/profile.txt)")
    parser.add_argument("--depth", type=int, help="keep only the first N vision blocks (quick proxy; default: all)")
    parser.add_argument("--export-only", metavar="VARIANT", help=argparse.SUPPRESS)  # the subprocess step
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    DEPTH["value"] = args.depth
    if args.export_only:
        variant = Variant.parse(args.export_only)
        print(json.dumps({variant.label: export_variant(args.model, variant, variant.file(args.out))}), flush=True)
        return 0
    variants = [Variant.parse(text) for text in args.variants.split(",")]
    exports = {}
    log = args.out / "exports.jsonl"
    for v in variants:
        if not v.file(args.out).exists():
            depth = ["--depth", str(args.depth)] if args.depth else []
            done = subprocess.run([sys.executable, "-m", "sfedge.benchmarks.vision_probe", "--model", args.model, *depth,
                                   "--out", str(args.out), "--export-only", v.label], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"export of {v.label} failed:\n{done.stderr[-3000:]}")
            line = done.stdout.strip().splitlines()[-1]
            with log.open("a") as stream:
                stream.write(line + "\n")
            exports.update(json.loads(line))
            print(f"exported {v.label}: {exports[v.label]}", flush=True)
    results = measure(args.model, variants, args.out, args.rounds, args.threads)
    (args.out / "results.json").write_text(json.dumps({"argv": sys.argv, "exports": exports, "results": results}, indent=1))
    print(f"{'variant':<20} {'s/frame':>8} {'x eager':>8} {'cosine':>8}  runs")
    for label, row in results.items():
        print(f"{label:<20} {row['s_per_frame']:>8.3f} {row['vs_eager']:>8.2f} {row['cosine']:>8.5f}  {row['runs']}")
    if args.profile:
        profile = profile_variants(args.model, variants, args.out)
        (args.out / "profile.txt").write_text(profile + "\n")
        print("\n" + profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
