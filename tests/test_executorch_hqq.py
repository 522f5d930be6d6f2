"""sfedge's scale-only HQQ (quantize/executorch_hqq.py) gives torchao's qparams bit for bit, faster."""
import pytest
import torch
from torch import nn

import sfedge.quantize.executorch_hqq as hqq
from sfedge.manifest import Component
from sfedge.quantize.executorch import LINEAR_8DA4W_G32, LINEAR_8DA8W, EMBEDDING_4W, EMBEDDING_8W, quantize_component

pytest.importorskip("torchao")

INT4, INT8 = (-8, 7), (-128, 127)


def _weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(rows, cols, generator=generator) * 0.02
    weights[0, :32] = 0.0  # a group of zeros (scale eps, den 0)
    weights[1, 5] = 1.0  # an outlier
    return weights


@pytest.mark.parametrize("rows, cols, group, bounds, dtype", [
    (96, 256, 32, INT4, torch.float32),      # 8da4w / 4w linears, several row blocks
    (37, 64, 32, INT4, torch.float32),       # rows not a multiple of the block
    (64, 192, 192, INT8, torch.float32),     # per-channel (8da8w / 8w): groups that keep moving for 20 iterations
    (48, 128, 32, INT4, torch.bfloat16),     # promoted to float32, scales back in the input dtype
    (40, 128, 64, INT8, torch.float32),
])
def test_matches_torchao_bit_for_bit(monkeypatch, rows, cols, group, bounds, dtype):
    monkeypatch.setattr(hqq, "BLOCK_VALUES", 1024)  # many blocks and chunks on a small weight
    weights = _weights(rows, cols, rows + cols).to(dtype)
    ref_q, ref_scale = hqq._torchao_hqq()(weights, [1, group], *bounds)
    q, scale = hqq.hqq_scale_only(weights, [1, group], *bounds)
    assert q.dtype == torch.int8 and q.shape == ref_q.shape
    assert torch.equal(q, ref_q.to(torch.int8))
    assert scale.dtype == ref_scale.dtype and torch.equal(scale, ref_scale)


def test_early_stop_and_iteration_limit_match(monkeypatch):
    monkeypatch.setattr(hqq, "BLOCK_VALUES", 2048)
    weights = _weights(64, 256, 3)
    for iters, tol in [(1, 1e-5), (3, 1e-5), (20, 1e-1), (20, 0.0)]:
        ref = hqq._torchao_hqq()(weights, [1, 32], *INT4, iters=iters, early_stop_tol=tol)
        ours = hqq.hqq_scale_only(weights, [1, 32], *INT4, iters=iters, early_stop_tol=tol)
        assert torch.equal(ours[0], ref[0].to(torch.int8)) and torch.equal(ours[1], ref[1]), (iters, tol)


def test_thread_count_restored():
    threads = torch.get_num_threads()
    hqq.hqq_scale_only(_weights(8, 64, 1), [1, 32], *INT4)
    assert torch.get_num_threads() == threads


def _quantized(module: nn.Module, component: Component, scheme, monkeypatch, reference: bool) -> dict:
    if reference:
        monkeypatch.setenv(hqq.ENV_HQQ, "torchao")
    else:
        monkeypatch.delenv(hqq.ENV_HQQ, raising=False)
    quantize_component(module, component.value, scheme)
    return {name: (param.qdata.clone(), param.scale.clone(), param.zero_point.clone()) if hasattr(param, "qdata")
            else (param.detach().clone(),) for name, param in module.named_parameters()}


@pytest.mark.parametrize("component, scheme, make", [
    (Component.TEXT_DECODER, LINEAR_8DA4W_G32, lambda: nn.Sequential(nn.Linear(128, 96), nn.Linear(96, 64, bias=False))),
    (Component.VISION_ENCODER, LINEAR_8DA8W, lambda: nn.Sequential(nn.Linear(64, 48))),
    (Component.TOKEN_EMBEDDING, EMBEDDING_4W, lambda: nn.Embedding(300, 64)),
    (Component.TOKEN_EMBEDDING, EMBEDDING_8W, lambda: nn.Embedding(300, 64)),
])
def test_quantize_component_stores_what_torchao_hqq_stores(monkeypatch, component, scheme, make):
    torch.manual_seed(0)
    module = make()
    twin = make()
    twin.load_state_dict(module.state_dict())
    calls = []
    original = hqq.hqq_scale_only
    monkeypatch.setattr(hqq, "hqq_scale_only", lambda *a, **k: calls.append(1) or original(*a, **k))
    ours = _quantized(module, component, scheme, monkeypatch, reference=False)
    assert calls, "quantize_component did not go through sfedge's HQQ"
    calls.clear()
    reference = _quantized(twin, component, scheme, monkeypatch, reference=True)
    assert not calls, "SFEDGE_ET_HQQ=torchao must keep torchao's own loop"
    assert ours.keys() == reference.keys() and ours
    for name in ours:
        assert all(torch.equal(a, b) for a, b in zip(ours[name], reference[name])), name


def test_parameter_weight_builds_no_autograd_graph():
    """A module's weight requires grad: the loop must not record its blocks' temporaries for autograd."""
    weights = nn.Parameter(_weights(64, 128, 5))
    q, scale = hqq.hqq_scale_only(weights, [1, 32], *INT4)
    assert not q.requires_grad and not scale.requires_grad and scale.grad_fn is None
    ref_q, ref_scale = hqq._torchao_hqq()(weights.detach(), [1, 32], *INT4)
    assert torch.equal(q, ref_q.to(torch.int8)) and torch.equal(scale, ref_scale)
