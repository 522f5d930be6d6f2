"""Parity: an artifact folder's session against the eager fp32 model rebuilt from its manifest.

Per component: max abs difference and cosine similarity on seeded inputs. End to end: the eager
model's greedy continuation of a spliced video prompt is fed to both sessions (teacher forcing,
so one early flip does not cascade) and the share of steps whose top-1 token agrees is reported.
Random weights make this meaningful because sfedge's random init gives token embeddings a std
of 3/sqrt(hidden): logits have a std of about 3, so top-1 is a clear choice, not a coin flip
among near-ties (the report prints the eager model's mean top-1 margin to show it).

Quantized recipes: 4-bit rounding of *random Gaussian* weights moves tiny models' logits by about
as much as their top-1 margins, so agreement with fp32 measures the weights, not the export. Where
the backend can apply its recipe to the eager model (quantize/<backend>.py registers a simulator,
e.g. torchao for ExecuTorch), the top-1 gate compares the artifact with that quantized eager model:
it isolates what this toolkit is responsible for (tracing, lowering, kernels, runtime). Agreement
with fp32 is still measured and printed, and every component must meet the recipe's cosine
tolerance against fp32. Backends without a simulator are gated against fp32 directly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List

import torch

from sfedge.manifest import read_manifest
from sfedge.quantize.recipes import Tolerance, get_recipe, simulator
from sfedge.runtime.generate import prefill
from sfedge.runtime.sessions import SessionOptions, open_session
from sfedge.runtime.sessions.base import ModelSession
from sfedge.runtime.sessions.eager import EagerSession


@dataclass
class ParityRow:
    component: str
    max_abs: float
    cosine: float
    passed: bool


@dataclass
class ParityReport:
    folder: str
    backend: str
    recipe: str
    tolerance: str
    rows: List[ParityRow]
    steps: int
    top1_agreement: float
    decoder_max_abs: float
    eager_top1_margin: float
    passed: bool
    top1_reference: str = "eager fp32"  # what the top-1 gate compared with
    top1_vs_fp32: float = 1.0
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"parity of {self.folder} ({self.backend}, recipe {self.recipe}; tolerance: {self.tolerance})",
                 f"{'component':<16} {'max abs':>10} {'cosine':>10}  result"]
        for row in self.rows:
            lines.append(f"{row.component:<16} {row.max_abs:>10.3g} {row.cosine:>10.6f}  {'ok' if row.passed else 'FAIL'}")
        lines.append(f"end to end: top-1 agreement {self.top1_agreement:.1%} with {self.top1_reference} over {self.steps} "
                     f"teacher-forced steps; with eager fp32 {self.top1_vs_fp32:.1%} (logits max abs vs fp32 "
                     f"{self.decoder_max_abs:.3g}; eager mean top-1 margin {self.eager_top1_margin:.2f})")
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def _compare(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    ref, got = reference.float().flatten(), candidate.float().flatten()
    if ref.shape != got.shape:
        return float("inf"), 0.0
    cosine = torch.nn.functional.cosine_similarity(ref, got, dim=0).item()
    return (ref - got).abs().max().item(), cosine


def _row(component: str, reference, candidate, tolerance: Tolerance) -> ParityRow:
    max_abs, cosine = _compare(reference, candidate)
    passed = max_abs == max_abs  # not NaN
    if tolerance.max_abs is not None:
        passed &= max_abs <= tolerance.max_abs
    if tolerance.min_cosine is not None:
        passed &= cosine >= tolerance.min_cosine
    return ParityRow(component, max_abs, cosine, bool(passed))


def _top2_margin(logits: torch.Tensor) -> float:
    top = torch.topk(logits.float(), 2).values
    return (top[0] - top[1]).item()


def compare_sessions(reference: ModelSession, candidate: ModelSession, tolerance: Tolerance, steps: int = 32,
                     seed: int = 0, text_tokens: int = 24) -> tuple[List[ParityRow], dict]:
    config = reference.config
    generator = torch.Generator().manual_seed(seed)
    batch = candidate.encoder_batch or 2
    size = config.vision.frame_size
    pixels = torch.randn(batch, 3, size, size, generator=generator).clamp_(-1, 1)
    rows = [_row("vision_encoder", reference.encode(pixels), candidate.encode(pixels), tolerance)]

    frame_counts = candidate.frame_counts or (config.slowfast.frames,)
    frame_pixels = torch.randn(max(frame_counts), 3, size, size, generator=generator).clamp_(-1, 1)
    all_features = torch.cat([reference.encode(frame_pixels[i:i + 1]) for i in range(max(frame_counts))])
    for frames in frame_counts:  # every exported projector; the default (first) one feeds the LLM below
        features = all_features[:frames]
        label = "projector" if frames == frame_counts[0] else f"projector[{frames}f]"
        rows.append(_row(label, reference.project(features), candidate.project(features), tolerance))
    visual = reference.project(all_features[:frame_counts[0]])

    vocab = min(config.llm.vocab_size, 1000)
    ids = torch.randint(0, vocab, (text_tokens,), generator=generator)
    rows.append(_row("token_embedding", reference.embed(ids), candidate.embed(ids), tolerance))

    prompt = torch.cat([reference.embed(ids[: text_tokens // 2]), visual, reference.embed(ids[text_tokens // 2:])])
    steps = max(0, min(steps, candidate.max_context - prompt.shape[0] - 1, reference.max_context - prompt.shape[0] - 1))
    reference.reset()
    candidate.reset()
    ref_logits, got_logits = prefill(reference, prompt), prefill(candidate, prompt)
    agree, margins, max_abs_all, cosines = 0, [], 0.0, []
    position = prompt.shape[0]
    for step in range(steps + 1):
        max_abs, cosine = _compare(ref_logits, got_logits)
        max_abs_all, cosines = max(max_abs_all, max_abs), cosines + [cosine]
        token = int(torch.argmax(ref_logits))
        agree += int(token == int(torch.argmax(got_logits)))
        margins.append(_top2_margin(ref_logits))
        if step == steps:
            break
        token_embeds = reference.embed(torch.tensor([token]))
        ref_logits = reference.decode(token_embeds, position)
        got_logits = candidate.decode(token_embeds, position)
        position += 1
    decoder_row = ParityRow("text_decoder", max_abs_all, min(cosines), True)
    if tolerance.max_abs is not None:
        decoder_row.passed &= max_abs_all <= tolerance.max_abs
    if tolerance.min_cosine is not None:
        decoder_row.passed &= min(cosines) >= tolerance.min_cosine
    rows.append(decoder_row)
    summary = {"steps": steps + 1, "top1_agreement": agree / (steps + 1), "decoder_max_abs": max_abs_all,
               "eager_top1_margin": sum(margins) / len(margins)}
    return rows, summary


def run_parity(folder: str | Path, options: SessionOptions = SessionOptions(), steps: int = 32, seed: int = 0) -> ParityReport:
    folder = Path(folder)
    manifest = read_manifest(folder)
    recipe = get_recipe(manifest.backend, manifest.recipe)
    candidate = open_session(folder, options)
    reference = EagerSession.open(folder, manifest, options)
    rows, summary = compare_sessions(reference, candidate, recipe.tolerance, steps, seed)
    top1, top1_reference = summary["top1_agreement"], "eager fp32"
    simulate = simulator(manifest.backend) if recipe.name != "fp32" else None
    if simulate is not None:
        simulated = EagerSession.open(folder, manifest, options)
        simulate(simulated.model, recipe)
        _, simulated_summary = compare_sessions(simulated, candidate, Tolerance(), steps, seed)
        top1, top1_reference = simulated_summary["top1_agreement"], f"eager + {recipe.name} (simulated)"
    top1_ok = recipe.tolerance.min_top1 is None or top1 >= recipe.tolerance.min_top1
    notes = []
    if summary["eager_top1_margin"] < 0.1:
        notes.append("the eager model's logits are nearly flat: top-1 agreement says little for these weights")
    return ParityReport(str(folder), manifest.backend, manifest.recipe, recipe.tolerance.describe(), rows,
                        summary["steps"], top1, summary["decoder_max_abs"], summary["eager_top1_margin"],
                        all(r.passed for r in rows) and top1_ok, top1_reference=top1_reference,
                        top1_vs_fp32=summary["top1_agreement"], notes=notes)
