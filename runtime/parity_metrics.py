"""Parity's arithmetic: per-tensor differences, non-finite detection, and agreement of two sessions'
teacher-forced logits (top-1 on decisive steps, KL divergence, max abs, cosine).

Every reduction here propagates NaN (``max(x, nan)`` and ``min`` over a list would silently skip it);
non-finite values are also reported by name, since parity fails on any of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


def non_finite(tensor: torch.Tensor, where: str) -> Optional[str]:
    """A one-line problem when ``tensor`` holds NaN or Inf, else None."""
    values = tensor.detach().float()
    bad = (~torch.isfinite(values)).sum().item()
    if not bad:
        return None
    nans = torch.isnan(values).sum().item()
    return f"{where}: {bad} non-finite value(s) of {values.numel()} ({nans} NaN, {bad - nans} Inf)"


def difference(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, cosine similarity); NaN in either input gives NaN, a shape mismatch (inf, 0)."""
    ref, got = reference.detach().float().flatten(), candidate.detach().float().flatten()
    if ref.shape != got.shape:
        return float("inf"), 0.0
    delta = (ref - got).abs()
    max_abs = float("nan") if torch.isnan(delta).any() else delta.max().item()
    cosine = torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=0).item()
    if not (torch.isfinite(ref).all() and torch.isfinite(got).all()):
        cosine = float("nan")
    return max_abs, cosine


def worst(values: Sequence[float], largest: bool = True) -> float:
    """max (or min) that returns NaN when any value is NaN."""
    if any(math.isnan(v) for v in values):
        return float("nan")
    return (max if largest else min)(values)


def top1_margin(logits: torch.Tensor) -> torch.Tensor:
    """Per step: the reference's top-1 logit minus its runner-up. logits [steps, vocab] -> [steps]."""
    top = torch.topk(logits.double(), 2, dim=-1).values
    return top[:, 0] - top[:, 1]


def kl_divergence(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Per step KL(P || Q) in nats, P = softmax(reference), Q = softmax(candidate). [steps, vocab] -> [steps]."""
    log_p = torch.log_softmax(reference.double(), dim=-1)
    log_q = torch.log_softmax(candidate.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


@dataclass(frozen=True)
class Agreement:
    """A candidate's teacher-forced logits against one reference's (both [steps, vocab])."""

    reference: str  # e.g. "eager fp32", "eager + 8da4w (simulated)"
    steps: int
    decisive_steps: int  # steps whose reference top-1 margin exceeds the near-tie threshold
    top1: float  # share of decisive steps whose top-1 token agrees (NaN when no step is decisive)
    top1_all_steps: float  # share over every step, near ties included (for information)
    kl_mean: float  # mean over steps of KL(reference || candidate), nats
    kl_max: float
    max_abs: float  # of the logits, over all steps
    min_cosine: float  # of the logits, per step, the lowest
    mean_margin: float  # the reference's mean top-1 margin
    near_tie: float  # the margin threshold used

    def describe(self) -> str:
        return (f"vs {self.reference}: top-1 {self.top1:.1%} of {self.decisive_steps} decisive steps "
                f"({self.top1_all_steps:.1%} of all {self.steps}), KL mean {self.kl_mean:.3g} max {self.kl_max:.3g} nats, "
                f"logits max abs {self.max_abs:.3g}, min cosine {self.min_cosine:.6f}")


def agreement(reference_name: str, reference: torch.Tensor, candidate: torch.Tensor, near_tie: float = 0.0) -> Agreement:
    ref, got = reference.double(), candidate.double()
    steps = ref.shape[0]
    margins = top1_margin(ref)
    same = ref.argmax(dim=-1) == got.argmax(dim=-1)
    finite = bool(torch.isfinite(ref).all() and torch.isfinite(got).all())
    decisive = margins > near_tie
    count = int(decisive.sum())
    top1 = same[decisive].double().mean().item() if count else float("nan")
    kl = kl_divergence(ref, got)
    rows = [difference(ref[i], got[i]) for i in range(steps)]
    nan = float("nan")
    return Agreement(
        reference=reference_name, steps=steps, decisive_steps=count,
        top1=top1 if finite else nan, top1_all_steps=same.double().mean().item() if finite else nan,
        kl_mean=kl.mean().item() if finite else nan, kl_max=kl.max().item() if finite else nan,
        max_abs=worst([r[0] for r in rows]), min_cosine=worst([r[1] for r in rows], largest=False),
        mean_margin=margins.mean().item(), near_tie=near_tie)


def stack(logits: List[torch.Tensor]) -> torch.Tensor:
    return torch.stack([step.detach().float().reshape(-1) for step in logits])
