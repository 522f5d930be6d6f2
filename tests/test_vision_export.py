"""The vision encoder's export graph (explicit attention + layer norm) and the ExecuTorch vision schemes."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sfedge.config import get_preset
from sfedge.models.vision import ExplicitLayerNorm, VisionEncoder, explicit_attention

TINY = get_preset("tiny")
VISION = dataclasses.replace(TINY.vision, depth=1)  # one block: lowering costs seconds per block


def _encoder(seed: int = 0) -> VisionEncoder:
    torch.manual_seed(seed)
    encoder = VisionEncoder(VISION)
    with torch.no_grad():
        encoder.pos_embed.normal_(0.0, 0.02)
    encoder.bake_position_embedding()
    return encoder.eval()


def test_explicit_attention_equals_sdpa():
    q, k, v = (torch.randn(6, 49, 16) for _ in range(3))
    torch.testing.assert_close(explicit_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-5)


def test_explicit_layer_norm_equals_nn_layer_norm():
    norm = torch.nn.LayerNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 7, 32) * 3 + 1
    torch.testing.assert_close(ExplicitLayerNorm(norm)(x), norm(x), atol=1e-5, rtol=1e-5)


def test_export_graph_keeps_the_function_and_eager_keeps_sdpa():
    encoder = _encoder()
    pixels = torch.randn(2, 3, VISION.frame_size, VISION.frame_size)
    with torch.no_grad():
        eager = encoder(pixels)
        assert not encoder.blocks[0].attn.explicit  # eager runs stay on F.scaled_dot_product_attention
        encoder.use_export_graph()
        exported_graph = encoder(pixels)
    assert encoder.blocks[0].attn.explicit and isinstance(encoder.blocks[0].norm1, ExplicitLayerNorm)
    torch.testing.assert_close(exported_graph, eager, atol=1e-4, rtol=1e-4)
    assert encoder.state_dict().keys() == _encoder().state_dict().keys()  # same parameter names (weights load)


def test_calibration_frames_are_seeded_and_normalized():
    from sfedge.export.executorch_vision import calibration_frames

    a = calibration_frames(32, 3, 0.5, 0.5, seed=0)
    assert a.shape == (3, 3, 32, 32) and a.min() >= -1.0 and a.max() <= 1.0
    torch.testing.assert_close(a, calibration_frames(32, 3, 0.5, 0.5, seed=0))
    assert not torch.equal(a, calibration_frames(32, 3, 0.5, 0.5, seed=1))


def _lower(encoder: VisionEncoder, scheme: str, sdpa_graph: bool = False):
    from sfedge.export.executorch import lower_checked
    from sfedge.export.executorch_vision import _export, trace_vision_encoder
    from sfedge.quantize.recipes import ComponentScheme

    if sdpa_graph:
        program = _export(encoder, (torch.zeros(1, 3, VISION.frame_size, VISION.frame_size),))
    else:
        program = trace_vision_encoder(encoder, ComponentScheme(scheme, group_size=0), 1)
    return lower_checked({"vision_encoder": program})


@pytest.mark.slow
def test_old_sdpa_graph_leaves_mask_ops_outside_the_delegate():
    pytest.importorskip("executorch")
    _, outside = _lower(_encoder(), "fp32", sdpa_graph=True)
    assert {"where.self", "native_layer_norm.default"} <= set(outside["vision_encoder"]), outside


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["8da8w", "int8-static", "fp16"])
def test_vision_scheme_fully_delegated_with_cosine(scheme: str):
    pytest.importorskip("executorch")
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    from sfedge.export.executorch_vision import calibration_frames

    encoder = _encoder()
    pixels = calibration_frames(VISION.frame_size, 1, VISION.pixel_mean, VISION.pixel_std, seed=7)
    with torch.no_grad():
        reference = encoder(pixels)
    data, outside = _lower(encoder, scheme)
    assert outside == {"vision_encoder": {}}, outside  # no portable op left besides trivial ones
    features = _load_for_executorch_from_buffer(data).run_method("vision_encoder", (pixels,))[0]
    cosine = F.cosine_similarity(features.flatten(), reference.flatten(), dim=0).item()
    assert cosine >= 0.99, (scheme, cosine)
