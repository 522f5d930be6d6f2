import pytest
import torch

from sfedge.budget import compute_budget, template_text_tokens
from sfedge.config import PRESETS, ModelConfig, get_preset, parse_slowfast_spec
from sfedge.errors import UsageError
from sfedge.params import count_parameters

V1_SPEC = "slowfast-slow_10frms_spatial_1d_max_pool-fast_4x4"


def test_presets_have_true_shapes():
    one, three, seven = (get_preset(n).llm for n in ("sf-llava-1.5-1b", "sf-llava-1.5-3b", "sf-llava-1.5-7b"))
    assert (one.hidden, one.layers, one.heads, one.kv_heads, one.intermediate, one.tie_embeddings) == (1536, 28, 12, 2, 8960, True)
    assert (three.hidden, three.layers, three.heads, three.intermediate) == (2048, 36, 16, 11008)
    assert (seven.hidden, seven.kv_heads, seven.vocab_size, seven.tie_embeddings) == (3584, 4, 152064, False)
    assert one.kv_bytes_per_token(2) == 28 * 1024 and three.kv_bytes_per_token(2) == 36 * 1024
    vision = get_preset("sf-llava-1.5-1b").vision
    assert (vision.width, vision.depth, vision.heads, vision.mlp_dim, vision.patches_per_frame) == (1152, 27, 16, 4304, 576)


def test_parameter_counts():
    counts = count_parameters(get_preset("sf-llava-1.5-1b"))
    assert 425e6 < counts["vision_encoder"] < 435e6  # ~431M (MODEL.md)
    assert 1.50e9 < counts["llm_total"] < 1.56e9  # Qwen2.5-1.5B with tied embedding
    assert count_parameters(get_preset("tiny"))["total"] < 2_000_000


def test_unknown_preset_lists_known():
    with pytest.raises(UsageError, match="known: .*tiny"):
        get_preset("sf-llava-9b")


def test_v1_spec_parses_with_v1_semantics():
    sf = parse_slowfast_spec(V1_SPEC, frames=50)
    assert (sf.slow_frames, sf.slow_pool, sf.slow_kernel, sf.fast_grid) == (10, "spatial_1d_max_pool", 2, (4, 4))
    assert sf.spec == V1_SPEC
    for frames, slow in [(50, 10), (37, 9), (128, 32), (7, 3)]:
        expected = torch.linspace(0, frames, slow + 1).to(torch.int32).tolist()[:-1]
        assert parse_slowfast_spec(f"slowfast-slow_{slow}frms_concat-fast_2x2", frames).slow_indices(frames) == expected


@pytest.mark.parametrize("spec", ["slowfast-slow_10frms-fast_4x4", "slow_10frms_spatial_1d_max_pool-fast_4x4",
                                  "slowfast-slow_10frms_spatial_3d_pool-fast_4x4", "slowfast-slow_xfrms_concat-fast_4x4"])
def test_malformed_spec_is_a_usage_error(spec):
    with pytest.raises(UsageError, match="malformed SlowFast spec"):
        parse_slowfast_spec(spec, 50)


def test_budget_figures_of_model_md():
    one = get_preset("sf-llava-1.5-1b")
    budget = compute_budget(one, text_tokens=template_text_tokens(one))
    assert (budget.frames, budget.slow_frames, budget.slow_tokens, budget.fast_tokens) == (128, 32, 4608, 4608)
    assert budget.visual_tokens == 9216
    assert budget.kv_cache_bytes["fp16"] == budget.total_tokens * 28 * 1024
    v1 = one.with_slowfast(50, V1_SPEC)
    assert compute_budget(v1, 0).visual_tokens == 3680
    assert compute_budget(v1, 0).slow_tokens == 2880


def test_config_round_trips_through_dict():
    for config in PRESETS.values():
        assert ModelConfig.from_dict(config.to_dict()) == config


def test_fast_grid_larger_than_patch_grid_is_rejected():
    with pytest.raises(UsageError, match="fast grid"):
        get_preset("tiny").with_slowfast(spec="slowfast-slow_2frms_concat-fast_8x8")
