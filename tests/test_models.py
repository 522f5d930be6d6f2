"""Model modules: shapes, SlowFast pathways against an independent reference, KV-cache correctness."""
import math

import pytest
import torch
import torch.nn.functional as F

from sfedge.config import get_preset
from sfedge.models import WeightsSource, build_model
from sfedge.models.vision import resize_position_grid


def reference_slowfast(features, spec_frames, slow_pool, fast_grid):
    """The SF-LLaVA v1 code's semantics, written out independently of sfedge's module."""
    t, n, d = features.shape
    side = int(math.sqrt(n))
    slow_index = torch.linspace(0, t, spec_frames + 1).to(torch.int32).tolist()[:-1]
    slow = features[slow_index]
    if slow_pool == "spatial_1d_max_pool":
        slow = torch.nn.MaxPool1d(2, 2)(slow.permute(0, 2, 1)).permute(0, 2, 1).reshape(-1, d)
    else:  # spatial_2d_avg_pool: 't (n0 n1) d -> d t n0 n1'
        grid = slow.reshape(len(slow_index), side, side, d).permute(3, 0, 1, 2)
        slow = torch.nn.AvgPool2d(2, 2)(grid).permute(1, 2, 3, 0).reshape(-1, d)
    grid = features.reshape(t, side, side, d).permute(3, 0, 1, 2)
    fast = torch.nn.AdaptiveAvgPool2d(fast_grid)(grid).permute(1, 2, 3, 0).reshape(-1, d)
    return torch.cat([slow, fast])


@pytest.mark.parametrize("spec,frames", [("slowfast-slow_3frms_spatial_1d_max_pool-fast_2x2", 7),
                                         ("slowfast-slow_2frms_spatial_2d_avg_pool-fast_2x2", 8),
                                         ("slowfast-slow_4frms_spatial_2d_avg_pool-fast_3x3", 8)])
def test_projector_matches_v1_semantics(spec, frames):
    config = get_preset("tiny").with_slowfast(frames, spec)
    model = build_model(config, max_seq_len=32)
    features = torch.randn(frames, config.vision.patches_per_frame, config.vision.width)
    got = model.projector(features)
    mlp_first = model.projector.mlp(features)
    expected = reference_slowfast(mlp_first, config.slowfast.slow_frames, config.slowfast.slow_pool, config.slowfast.fast_grid)
    assert got.shape == (model.projector.visual_tokens(frames), config.llm.hidden)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_projector_mlp_after_pooling_flag():
    import dataclasses

    config = get_preset("tiny")
    after = config.replace(slowfast=dataclasses.replace(config.slowfast, mlp_before_pool=False))
    model = build_model(after, max_seq_len=32)
    features = torch.randn(8, 16, config.vision.width)
    pooled = reference_slowfast(features, 2, "spatial_2d_avg_pool", (2, 2))
    torch.testing.assert_close(model.projector(features), model.projector.mlp(pooled), atol=1e-5, rtol=1e-5)


def test_position_grid_is_resized_bilinearly_once(tiny_model):
    vision = tiny_model.vision_encoder
    grid = vision.pos_embed.reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, -1)
    torch.testing.assert_close(vision.frame_pos_embed, expected)
    assert resize_position_grid(vision.pos_embed, 8, 8) is vision.pos_embed


def test_vision_encoder_shapes(tiny_model, tiny_config):
    out = tiny_model.vision_encoder(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, tiny_config.vision.patches_per_frame, tiny_config.vision.width)


def test_prefill_then_decode_equals_one_pass(tiny_model):
    decoder = tiny_model.text_decoder
    embeds = torch.randn(1, 20, 64)
    decoder.last_logits_only = False
    try:
        decoder.reset_cache()
        full = decoder(embeds, torch.tensor([0]))
    finally:
        decoder.last_logits_only = True
    decoder.reset_cache()
    decoder(embeds[:, :11], torch.tensor([0]))  # prefill 11 tokens
    for i in range(11, 20):  # then one token at a time through the cache
        step = decoder(embeds[:, i:i + 1], torch.tensor([i]))
        torch.testing.assert_close(step[0], full[0, i], atol=1e-5, rtol=1e-5)


def test_random_weights_are_seeded(tiny_config):
    a = build_model(tiny_config, WeightsSource(seed=3), max_seq_len=16)
    b = build_model(tiny_config, WeightsSource(seed=3), max_seq_len=16)
    c = build_model(tiny_config, WeightsSource(seed=4), max_seq_len=16)
    assert torch.equal(a.text_decoder.layers[0].mlp.up_proj.weight, b.text_decoder.layers[0].mlp.up_proj.weight)
    assert not torch.equal(a.text_decoder.layers[0].mlp.up_proj.weight, c.text_decoder.layers[0].mlp.up_proj.weight)
    assert a.text_decoder.lm_head.weight is a.token_embedding.embed_tokens.weight or \
        a.text_decoder.lm_head.weight.data_ptr() == a.token_embedding.embed_tokens.weight.data_ptr()
