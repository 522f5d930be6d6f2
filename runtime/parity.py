"""Parity: an artifact folder's session against the eager fp32 model rebuilt from its manifest.

Per component: max abs difference and cosine similarity on seeded inputs. End to end: the eager
fp32 model's greedy continuation of a spliced video prompt is fed to every session (teacher
forcing, so one early flip does not cascade) and the logits of each step are compared.
Random weights make this meaningful because sfedge's random init gives token embeddings a std
of 3/sqrt(hidden): logits have a std of about 3, so top-1 is usually a clear choice (the report
prints the eager model's mean top-1 margin to show it).

Two figures, two jobs:
- The gate. Where the backend can apply its recipe to the eager model (quantize/<backend>.py
  registers a simulator: torchao for ExecuTorch, a block-wise quantize-dequantize for ONNX), the
  artifact is compared with that simulated model at what an exact export achieves
  (``recipes.EXACT_EXPORT`` unless the recipe's tolerance names another: 100 % top-1 on decisive
  steps and a small mean KL): it isolates what this toolkit is responsible for (tracing, lowering,
  kernels, runtime) from the rounding of the weights. Backends without a simulator are gated against
  fp32 with the recipe's ``min_top1``.
- Agreement with fp32, reported under its own name: mean KL(fp32 || artifact) over the steps and
  top-1; the KL is bounded by the recipe's ``max_kl`` (measured per recipe, see quantize/recipes.py).
Top-1 counts only decisive steps: a step whose reference top-1 logit leads the runner-up by no more
than the tolerance's ``near_tie`` is a near tie that rounding may flip; such steps are reported.
Every NaN/Inf anywhere (component outputs, any step's logits, in any session) fails, by name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from sfedge.errors import UsageError
from sfedge.manifest import check_weights_fingerprint, read_manifest
from sfedge.quantize.recipes import EXACT_EXPORT, Tolerance, get_recipe, simulator
from sfedge.runtime.parity_metrics import Agreement, agreement, difference, non_finite, stack, worst
from sfedge.runtime.sessions import SessionOptions, open_session
from sfedge.runtime.sessions.base import ModelSession
from sfedge.runtime.sessions.eager import EagerSession

DEFAULT_STEPS = 32
MAX_STEPS = 4096


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
    top1_agreement: float  # with the gate's reference (top1_reference), decisive steps only
    decoder_max_abs: float  # logits vs fp32
    eager_top1_margin: float
    passed: bool
    top1_reference: str = "eager fp32"  # what the gate compared with
    top1_vs_fp32: float = 1.0
    kl_vs_fp32: float = 0.0  # mean KL(fp32 || artifact), nats
    gate: Optional[dict] = None  # Agreement with the gate's reference
    fp32: Optional[dict] = None  # Agreement with eager fp32
    failures: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"parity of {self.folder} ({self.backend}, recipe {self.recipe}; tolerance: {self.tolerance})",
                 f"{'component':<16} {'max abs':>10} {'cosine':>10}  result"]
        for row in self.rows:
            lines.append(f"{row.component:<16} {row.max_abs:>10.3g} {row.cosine:>10.6f}  {'ok' if row.passed else 'FAIL'}")
        if self.gate:
            lines.append(f"gate: artifact {Agreement(**self.gate).describe()}")
        if self.fp32:
            lines.append(f"agreement with fp32: artifact {Agreement(**self.fp32).describe()}")
        lines.append(f"eager mean top-1 margin {self.eager_top1_margin:.2f} over {self.steps} teacher-forced steps")
        lines.extend(f"note: {n}" for n in self.notes)
        lines.extend(f"FAIL: {f}" for f in self.failures)
        lines.append("PASS" if self.passed else f"FAIL ({len(self.failures)} check(s))")
        return "\n".join(lines)


@dataclass(frozen=True)
class ParityInputs:
    pixels: torch.Tensor  # the encoder's batch
    frame_pixels: torch.Tensor  # one frame per projector input
    ids: torch.Tensor  # text token ids around the visual tokens


def check_arguments(steps: int, seed: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"--steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed must be an integer >= 0, got {seed!r}")


def make_inputs(config, candidate: ModelSession, seed: int, text_tokens: int = 24) -> ParityInputs:
    generator = torch.Generator().manual_seed(seed)
    size = config.vision.frame_size
    pixels = torch.randn(candidate.encoder_batch or 2, 3, size, size, generator=generator).clamp_(-1, 1)
    frame_counts = candidate.frame_counts or (config.slowfast.frames,)
    frame_pixels = torch.randn(max(frame_counts), 3, size, size, generator=generator).clamp_(-1, 1)
    ids = torch.randint(0, min(config.llm.vocab_size, 1000), (text_tokens,), generator=generator)
    return ParityInputs(pixels, frame_pixels, ids)


def _row(component: str, reference, candidate, tolerance: Tolerance, failures: List[str]) -> ParityRow:
    for tensor, who in ((reference, "eager fp32"), (candidate, "artifact")):
        problem = non_finite(tensor, f"{component} ({who})")
        if problem:
            failures.append(problem)
    max_abs, cosine = difference(reference, candidate)
    reasons = []
    if math.isnan(max_abs) or math.isnan(cosine):
        reasons.append("NaN difference")
    if tolerance.max_abs is not None and not max_abs <= tolerance.max_abs:
        reasons.append(f"max abs {max_abs:.3g} > {tolerance.max_abs:g}")
    if tolerance.min_cosine is not None and not cosine >= tolerance.min_cosine:
        reasons.append(f"cosine {cosine:.6f} < {tolerance.min_cosine:g}")
    failures.extend(f"{component}: {reason}" for reason in reasons)
    return ParityRow(component, max_abs, cosine, not reasons)


def component_rows(reference: ModelSession, candidate: ModelSession, inputs: ParityInputs, tolerance: Tolerance,
                   failures: List[str]) -> tuple[List[ParityRow], torch.Tensor]:
    """Rows for the encoder, every projector and the embedding; returns them and the prompt embeddings."""
    rows = [_row("vision_encoder", reference.encode(inputs.pixels), candidate.encode(inputs.pixels), tolerance, failures)]
    frames_total = inputs.frame_pixels.shape[0]
    features = torch.cat([reference.encode(inputs.frame_pixels[i:i + 1]) for i in range(frames_total)])
    frame_counts = candidate.frame_counts or (reference.config.slowfast.frames,)
    for frames in frame_counts:  # every exported projector; the default (first) one feeds the LLM below
        label = "projector" if frames == frame_counts[0] else f"projector[{frames}f]"
        rows.append(_row(label, reference.project(features[:frames]), candidate.project(features[:frames]), tolerance, failures))
    visual = reference.project(features[:frame_counts[0]])
    ids = inputs.ids
    rows.append(_row("token_embedding", reference.embed(ids), candidate.embed(ids), tolerance, failures))
    half = ids.shape[0] // 2
    prompt = torch.cat([reference.embed(ids[:half]), visual, reference.embed(ids[half:])])
    return rows, prompt


def teacher_forced(driver: ModelSession, sessions: Sequence[ModelSession], prompt: torch.Tensor,
                   steps: int) -> List[torch.Tensor]:
    """Logits [steps + 1, vocab] of each session: the prompt, then the driver's greedy tokens."""
    from sfedge.runtime.generate import prefill

    logits: List[List[torch.Tensor]] = [[] for _ in sessions]
    for session in sessions:
        session.reset()
    current = [prefill(session, prompt) for session in sessions]
    position = prompt.shape[0]
    driver_index = list(sessions).index(driver)
    for step in range(steps + 1):
        for index, value in enumerate(current):
            logits[index].append(value)
        if step == steps:
            break
        token = int(torch.argmax(torch.nan_to_num(current[driver_index].float(), nan=-math.inf)))
        embeds = driver.embed(torch.tensor([token]))
        current = [session.decode(embeds, position) for session in sessions]
        position += 1
    return [stack(values) for values in logits]


def usable_steps(steps: int, prompt_length: int, sessions: Sequence[ModelSession]) -> int:
    return max(0, min([steps] + [s.max_context - prompt_length - 1 for s in sessions]))


def step_problems(logits: torch.Tensor, who: str) -> List[str]:
    out = []
    for step in range(logits.shape[0]):
        problem = non_finite(logits[step], f"text_decoder logits at step {step} ({who})")
        if problem:
            out.append(problem)
    return out


def compare_sessions(reference: ModelSession, candidate: ModelSession, tolerance: Tolerance, steps: int = DEFAULT_STEPS,
                     seed: int = 0, text_tokens: int = 24) -> tuple[List[ParityRow], dict]:
    """Components and teacher-forced logits of ``candidate`` against ``reference`` (any two sessions)."""
    failures: List[str] = []
    rows, prompt = component_rows(reference, candidate, make_inputs(reference.config, candidate, seed, text_tokens),
                                  tolerance, failures)
    steps = usable_steps(steps, prompt.shape[0], (reference, candidate))
    ref_logits, got_logits = teacher_forced(reference, (reference, candidate), prompt, steps)
    failures += step_problems(ref_logits, "reference") + step_problems(got_logits, "candidate")
    result = agreement("reference", ref_logits, got_logits, tolerance.near_tie)
    rows.append(_decoder_row(result, tolerance, failures))
    summary = {"steps": steps + 1, "top1_agreement": result.top1, "decoder_max_abs": result.max_abs,
               "eager_top1_margin": result.mean_margin, "kl": result.kl_mean, "failures": failures}
    return rows, summary


def _decoder_row(vs_fp32: Agreement, tolerance: Tolerance, failures: List[str]) -> ParityRow:
    reasons = []
    if math.isnan(vs_fp32.max_abs) or math.isnan(vs_fp32.min_cosine):
        reasons.append("NaN logits")
    if tolerance.max_abs is not None and not vs_fp32.max_abs <= tolerance.max_abs:
        reasons.append(f"logits max abs {vs_fp32.max_abs:.3g} > {tolerance.max_abs:g}")
    if tolerance.min_cosine is not None and not vs_fp32.min_cosine >= tolerance.min_cosine:
        reasons.append(f"logits cosine {vs_fp32.min_cosine:.6f} < {tolerance.min_cosine:g}")
    failures.extend(f"text_decoder: {reason}" for reason in reasons)
    return ParityRow("text_decoder", vs_fp32.max_abs, vs_fp32.min_cosine, not reasons)


def _prefill_graph_row(rows: List[ParityRow], logits: Sequence[torch.Tensor], prompt_length: int, chunk: int,
                       tolerance: Tolerance, failures: List[str]) -> str:
    """A recipe with a decode graph (Recipe.decode): step 0's logits (the last prefill chunk's) come from the
    prefill graph, every later step's from the decode graph. Step 0 gets a row against fp32 with the prefill
    graph's tolerance; the text_decoder row and the gate cover all steps. Returns a note saying so."""
    last_chunk = prompt_length - (prompt_length - 1) // chunk * chunk
    if last_chunk == 1:  # a one-token last chunk runs the decode graph: nothing of the prefill graph to compare
        return "the prompt's last chunk has one token (decode graph): the prefill graph has no row of its own"
    bound = Tolerance(tolerance.max_abs, None, tolerance.min_cosine)  # one logits vector: no top-1 / KL statistics
    rows.append(_row("text_decoder[prefill graph]", logits[0][0], logits[1][0], bound, failures))
    return (f"two decoder graphs: step 0 ({prompt_length}-token prompt, last chunk {last_chunk} tokens) ran the prefill "
            f"graph, held to {bound.describe()} against fp32; steps 1..{logits[1].shape[0] - 1} ran the decode graph")


def gate_failures(result: Agreement, tolerance: Tolerance) -> List[str]:
    """Top-1 on decisive steps and (when bounded) mean KL of the artifact against the gate's reference."""
    out = []
    if tolerance.min_top1 is not None:
        if result.decisive_steps == 0:
            out.append(f"top-1 vs {result.reference}: no decisive step (every top-1 margin <= {result.near_tie:g}): "
                       "nothing was gated; use more --steps or another --seed")
        elif not result.top1 >= tolerance.min_top1:
            out.append(f"top-1 vs {result.reference}: {result.top1:.1%} < {tolerance.min_top1:.0%} "
                       f"over {result.decisive_steps} decisive steps")
    if tolerance.max_kl is not None and not result.kl_mean <= tolerance.max_kl:
        out.append(f"KL vs {result.reference}: mean {result.kl_mean:.3g} > {tolerance.max_kl:g} nats")
    return out


def run_parity(folder: str | Path, options: SessionOptions = SessionOptions(), steps: int = DEFAULT_STEPS,
               seed: int = 0) -> ParityReport:
    check_arguments(steps, seed)
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_weights_fingerprint(manifest)  # the eager reference is rebuilt from the same weights, or not at all
    recipe = get_recipe(manifest.backend, manifest.recipe)
    tolerance = recipe.tolerance
    candidate = open_session(folder, options)
    reference = EagerSession.open(folder, manifest, options)
    sessions: List[ModelSession] = [reference, candidate]
    simulate = simulator(manifest.backend) if recipe.name != "fp32" else None
    if simulate is not None:
        simulated = EagerSession.open(folder, manifest, options)
        simulate(simulated.model, recipe)
        sessions.append(simulated)

    failures: List[str] = []
    rows, prompt = component_rows(reference, candidate, make_inputs(reference.config, candidate, seed), tolerance, failures)
    steps = usable_steps(steps, prompt.shape[0], sessions)
    logits = teacher_forced(reference, sessions, prompt, steps)
    for values, who in zip(logits, ("eager fp32", "artifact", f"eager + {recipe.name} (simulated)")):
        failures += step_problems(values, who)

    vs_fp32 = agreement("eager fp32", logits[0], logits[1], tolerance.near_tie)
    rows.append(_decoder_row(vs_fp32, tolerance, failures))
    notes = []
    if recipe.prefill_tolerance is not None:  # two decoder graphs: the prefill graph's own logits, its own bound
        notes.append(_prefill_graph_row(rows, logits, prompt.shape[0], candidate.max_prefill_chunk,
                                        recipe.prefill_tolerance, failures))
    if tolerance.max_kl is not None and not vs_fp32.kl_mean <= tolerance.max_kl:
        failures.append(f"agreement with fp32: mean KL {vs_fp32.kl_mean:.3g} > {tolerance.max_kl:g} nats "
                        f"(recipe {recipe.name}'s bound)")
    if simulate is not None:
        exact = tolerance.simulated or EXACT_EXPORT
        gate = agreement(f"eager + {recipe.name} (simulated)", logits[2], logits[1], exact.near_tie)
        failures += gate_failures(gate, exact)
        vs_fp32_text = Tolerance(tolerance.max_abs, None, tolerance.min_cosine, tolerance.max_kl).describe()
        gate_text = f"{vs_fp32_text}; gate: {exact.describe('the simulated recipe')} against the simulated recipe"
    else:
        gate = vs_fp32
        failures += gate_failures(gate, Tolerance(min_top1=tolerance.min_top1))
        gate_text = f"{tolerance.describe()}; gate: against eager fp32"
    if vs_fp32.mean_margin < 0.1:
        notes.append("the eager model's logits are nearly flat: top-1 agreement says little for these weights")
    if gate.decisive_steps < gate.steps:
        notes.append(f"{gate.steps - gate.decisive_steps} of {gate.steps} steps are near ties (top-1 margin of "
                     f"{gate.reference} <= {gate.near_tie:g}) and not counted in its top-1")
    return ParityReport(str(folder), manifest.backend, manifest.recipe, gate_text, rows,
                        steps + 1, gate.top1, vs_fp32.max_abs, vs_fp32.mean_margin, not failures,
                        top1_reference=gate.reference, top1_vs_fp32=vs_fp32.top1_all_steps, kl_vs_fp32=vs_fp32.kl_mean,
                        gate=asdict(gate), fp32=asdict(vs_fp32), failures=failures, notes=notes)
