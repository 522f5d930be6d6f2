"""torchao's scale-only HQQ (the qparams of every ExecuTorch recipe's 8da4w / 8da8w / 4w / 8w weights), computed
faster with the same result, bit for bit.

``executorch.extension.llm.export.quantize.quantize_model_`` asks torchao 0.18 for
``intx_choose_qparams_algorithm="hqq_scale_only"``: ``torchao.quantization.quant_primitives.
_choose_qparams_and_quantize_scale_only_hqq`` iterates up to 20 times over the whole weight
(``Q = round(W / s)``, ``s = sum(W Q) / sum(Q Q)`` per group) until the largest relative change of any group's
scale is below 1e-5. Each iteration allocates several full-size float32 temporaries, so it is memory-bound
and holds ~3x the weight's bytes at once (the 151,936-row token table set the ExecuTorch export's peak).

``hqq_scale_only`` runs the same iterations with two changes that cannot change the result:

* **Groups that reached a fixed point drop out.** A group's update depends only on its own weights and scale;
  once an iteration leaves its scale bit-identical, every later iteration would too (and its relative change,
  0, never sets the stopping test's maximum). Only groups whose scale still moved are iterated again.
* **Row blocks, one thread.** Groups are processed 1M values at a time (temporaries of a few MiB, not ~3x
  the whole weight) on one intra-op thread: the ops are many and small once most groups have stopped, and
  two OpenMP threads on a busy 2-core machine spent 4-5x the CPU time spinning (11008 x 2048, group 32:
  2.6 s CPU with 2 threads, 0.65 s with 1; torchao's loop 5.6-7.1 s).

Every per-group reduction is a sum of ``group_size`` contiguous values, as in torchao; the equality is
tested against torchao's function (tests/test_executorch_hqq.py) and on the 3B's shapes (docs/executorch.md).
``fast_hqq()`` swaps it in for torchao's inside a ``with`` block; ``SFEDGE_ET_HQQ=torchao`` keeps torchao's own.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from sfedge.errors import env_switch

ENV_HQQ = "SFEDGE_ET_HQQ"  # "torchao": run torchao's own loop (the reference), anything else / unset: this one
BLOCK_VALUES = 1 << 20  # values per row block (4 MiB of float32)
_TORCHAO_MODULE = "torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor"
_TORCHAO_NAME = "_choose_qparams_and_quantize_scale_only_hqq"


def hqq_scale_only(hp_tensor: torch.Tensor, block_size: Sequence[int], qmin: int, qmax: int, *, iters: int = 20,
                   stochastic: bool = False, early_stop_tol: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same signature and result as torchao's ``_choose_qparams_and_quantize_scale_only_hqq`` (qdata int8
    instead of int32: torchao casts it to int8 right after). Stochastic rounding is delegated to torchao."""
    if stochastic or hp_tensor.ndim != 2 or len(block_size) != 2 or block_size[0] != 1:
        return _torchao_hqq()(hp_tensor, block_size, qmin, qmax, iters=iters, stochastic=stochastic,
                              early_stop_tol=early_stop_tol)
    assert qmin < qmax, "qmin must be < qmax"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring: many cache-sized ops, not a few huge ones
    try:
        with torch.no_grad():  # a Parameter's weight: no autograd graph holding every block's temporaries
            return _hqq_blocks(hp_tensor.detach(), int(block_size[1]), qmin, qmax, iters, early_stop_tol)
    finally:
        torch.set_num_threads(threads)


def _hqq_blocks(hp_tensor: torch.Tensor, group: int, qmin: int, qmax: int, iters: int,
                early_stop_tol: float) -> Tuple[torch.Tensor, torch.Tensor]:
    n, k = hp_tensor.shape
    assert k % group == 0, f"in_features={k} must be divisible by group_size={group}"
    eps = torch.finfo(torch.float32).eps
    weights = hp_tensor.to(torch.float32).contiguous().view(-1, group)  # one row per group
    groups = weights.shape[0]
    qabs = max(abs(qmin), abs(qmax)) or 1
    step = max(1, BLOCK_VALUES // group)
    blocks = [(start, min(start + step, groups)) for start in range(0, groups, step)]
    scale = torch.empty(groups, dtype=torch.float32)
    for lo, hi in blocks:
        scale[lo:hi] = (weights[lo:hi].abs().amax(dim=1) / qabs).clamp_min(eps)
    moving: Optional[torch.Tensor] = None  # indices of the groups whose scale still moves (None: all of them)
    for _ in range(max(1, iters)):
        largest = torch.zeros((), dtype=torch.float32)
        still = []
        for lo, hi, index in _chunks(blocks, moving, step):
            w = weights[lo:hi] if index is None else weights.index_select(0, index)
            old = scale[lo:hi] if index is None else scale.index_select(0, index)
            new, change = _step(w, old, qmin, qmax, eps)
            largest = torch.maximum(largest, change)
            if index is None:
                still.append((new != old).nonzero().flatten().add_(lo))
                scale[lo:hi] = new
            else:
                still.append(index[new != old])
                scale.index_copy_(0, index, new)
        moving = torch.cat(still) if still else torch.empty(0, dtype=torch.long)
        if largest < early_stop_tol:
            break
    qdata = torch.empty(groups, group, dtype=torch.int8)
    for lo, hi in blocks:
        qdata[lo:hi] = (weights[lo:hi] / scale[lo:hi].unsqueeze(-1)).round_().clamp_(qmin, qmax)
    return qdata.view(n, k), scale.view(n, k // group).to(hp_tensor.dtype)


def _chunks(blocks: List[Tuple[int, int]], moving: Optional[torch.Tensor], step: int):
    """(lo, hi, None) per row block while every group moves, else (0, 0, indices) per ``step`` moving groups."""
    if moving is None:
        return [(lo, hi, None) for lo, hi in blocks]
    return [(0, 0, index) for index in moving.split(step) if index.numel()]


def _step(w: torch.Tensor, old: torch.Tensor, qmin: int, qmax: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One HQQ update of the groups ``w`` [G, group] from scales ``old`` [G]: (new scales, largest relative change),
    the same expressions as torchao's loop body."""
    q = (w / old.unsqueeze(-1)).round_().clamp_(qmin, qmax)
    num = (w * q).sum(dim=1, dtype=torch.float32)
    den = (q * q).sum(dim=1, dtype=torch.float32)
    new = torch.where(den > 0, num / den, old).clamp_min(eps).abs()
    return new, ((new - old).abs() / old.clamp_min(eps)).max()


def _torchao_hqq():
    import importlib
    return getattr(importlib.import_module("torchao.quantization.quant_primitives"), _TORCHAO_NAME)


def use_torchao_hqq() -> bool:
    return env_switch(ENV_HQQ, ("torchao",)) == "torchao"


@contextlib.contextmanager
def fast_hqq() -> Iterator[None]:
    """Within the block, torchao's IntxUnpackedToInt8Tensor.from_hp computes scale-only HQQ with ``hqq_scale_only``
    (unless ``SFEDGE_ET_HQQ=torchao``, or torchao no longer has the function this replaces)."""
    import importlib
    try:
        module = importlib.import_module(_TORCHAO_MODULE)
    except ModuleNotFoundError:
        module = None
    if use_torchao_hqq() or module is None or not hasattr(module, _TORCHAO_NAME):
        yield
        return
    original = getattr(module, _TORCHAO_NAME)
    setattr(module, _TORCHAO_NAME, hqq_scale_only)
    try:
        yield
    finally:
        setattr(module, _TORCHAO_NAME, original)
