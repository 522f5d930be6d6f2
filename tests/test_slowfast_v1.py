"""SlowFast is v1-exact for every frame count, including T < N (apple/ml-slowfast-llava, `prepare_slowfast`).

The reference below is an independent transcription of the v1 formula with exact integer arithmetic
(int(linspace(0, T, N + 1))[:-1] = floor(i * T / N) for i < N), not a call into sfedge.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from sfedge.budget import compute_budget
from sfedge.cli import main
from sfedge.config import ModelConfig, get_preset, parse_slowfast_spec
from sfedge.models.projector import SlowFastProjector


def v1_slow_indices(frames: int, slow: int) -> list:
    return [i * frames // slow for i in range(slow)]


def test_v1_indices_of_model_md():
    assert v1_slow_indices(7, 10) == [0, 0, 1, 2, 2, 3, 4, 4, 5, 6]  # MODEL.md's example of the v1 code


@pytest.mark.parametrize("frames,slow", [(7, 10), (1, 4), (3, 32), (16, 32), (10, 10), (32, 32), (50, 10), (128, 32), (37, 9)])
def test_slow_indices_match_v1_for_fewer_equal_and_more_frames(frames, slow):
    sf = parse_slowfast_spec(f"slowfast-slow_{slow}frms_spatial_2d_avg_pool-fast_2x2", frames)
    assert sf.slow_indices(frames) == v1_slow_indices(frames, slow)
    assert len(sf.slow_indices(frames)) == slow  # N slow frames, whatever T


@pytest.mark.parametrize("frames,visual", [(16, 5184), (32, 32 * 144 + 32 * 36), (128, 9216), (1, 32 * 144 + 36)])
def test_budget_counts_n_slow_frames_for_short_videos(capsys, frames, visual):
    """32 slow frames x 144 + T x 36: --frames 16 on the 1B gives 5,184 visual tokens (v1), not 2,880."""
    assert main(["budget", "--model", "sf-llava-1.5-1b", "--frames", str(frames), "--json"]) == 0
    budget = json.loads(capsys.readouterr().out)
    assert budget["slow_frames"] == 32 and budget["visual_tokens"] == visual


def test_v1_spec_budget_with_fewer_frames_than_slow_frames():
    config = get_preset("sf-llava-1.5-1b").with_slowfast(7, "slowfast-slow_10frms_spatial_1d_max_pool-fast_4x4")
    budget = compute_budget(config, 0)
    assert (budget.slow_frames, budget.slow_tokens, budget.fast_tokens) == (10, 10 * 288, 7 * 16)


def _v1_reference(features: torch.Tensor, mlp, grid: int, slow: int, fast: int) -> torch.Tensor:
    """MLP, then slow = 2x2 avg pool of the v1 slow frames, fast = fast x fast avg pool of all frames."""
    x = mlp(features)
    t, _, d = x.shape
    img = x.transpose(1, 2).reshape(t, d, grid, grid)
    slow_tokens = [F.avg_pool2d(img[i:i + 1], 2, 2).flatten(2).transpose(1, 2)[0] for i in v1_slow_indices(t, slow)]
    fast_tokens = F.adaptive_avg_pool2d(img, (fast, fast)).flatten(2).transpose(1, 2).reshape(-1, d)
    return torch.cat([*slow_tokens, fast_tokens])


@pytest.mark.parametrize("frames", [1, 3, 4, 9])
def test_projector_repeats_slow_frames_like_v1(frames):
    tiny = get_preset("tiny")
    sf = parse_slowfast_spec("slowfast-slow_4frms_spatial_2d_avg_pool-fast_2x2", frames)
    grid = tiny.vision.grid
    projector = SlowFastProjector(sf, tiny.vision.width, tiny.llm.hidden, grid).eval()
    features = torch.randn(frames, grid * grid, tiny.vision.width)
    with torch.no_grad():
        got = projector(features)
        expected = _v1_reference(features, projector.mlp, grid, 4, 2)
    assert got.shape == expected.shape == (projector.visual_tokens(frames), tiny.llm.hidden)
    torch.testing.assert_close(got, expected)


def test_short_video_end_to_end_uses_n_slow_frames(capsys, demo_video):
    """The tiny preset (N = 2 slow frames) on 1 frame: 2 x 4 slow + 1 x 4 fast = 12 visual tokens."""
    code = main(["run", "--model", "tiny", "--video", str(demo_video), "--prompt", "hi", "--frames", "1",
                 "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 0 and "visual tokens 12 " in err


# --- the named non-v1 option: --no-slow-repeat (SlowFastConfig.slow_repeat = False) ---------------

@pytest.mark.parametrize("frames,slow", [(7, 10), (16, 32), (32, 32), (50, 10)])
def test_no_slow_repeat_keeps_each_frame_once(frames, slow):
    sf = parse_slowfast_spec(f"slowfast-slow_{slow}frms_spatial_2d_avg_pool-fast_2x2", frames, slow_repeat=False)
    assert sf.slow_indices(frames) == v1_slow_indices(frames, min(frames, slow))


def test_no_slow_repeat_budget_and_cli(capsys):
    assert main(["budget", "--model", "sf-llava-1.5-1b", "--frames", "16", "--no-slow-repeat", "--json"]) == 0
    budget = json.loads(capsys.readouterr().out)
    assert (budget["slow_frames"], budget["visual_tokens"]) == (16, 16 * 144 + 16 * 36)  # 2,880
    spec = get_preset("sf-llava-1.5-1b").with_slowfast(7, "slowfast-slow_10frms_spatial_1d_max_pool-fast_4x4", False)
    assert compute_budget(spec, 0).slow_frames == 7


def test_no_slow_repeat_projector_shape():
    tiny = get_preset("tiny").with_slowfast(1, slow_repeat=False)
    projector = SlowFastProjector(tiny.slowfast, tiny.vision.width, tiny.llm.hidden, tiny.vision.grid).eval()
    with torch.no_grad():
        out = projector(torch.randn(1, tiny.vision.grid ** 2, tiny.vision.width))
    assert out.shape[0] == projector.visual_tokens(1) == 4 + 4  # one slow frame (2x2) + one fast frame (2x2)


def test_manifest_config_without_the_field_reads_as_the_old_rule():
    """Folders exported before v1-exact SlowFast hold projectors of min(N, T) slow frames."""
    data = get_preset("tiny").with_slowfast(1).to_dict()
    assert ModelConfig.from_dict(data).slowfast.slow_repeat is True
    del data["slowfast"]["slow_repeat"]
    assert ModelConfig.from_dict(data).slowfast.slow_repeat is False


def test_no_slow_repeat_is_refused_with_an_artifact_folder(capsys, tmp_path):
    code = main(["run", str(tmp_path), "--video", "x.mp4", "--prompt", "hi", "--no-slow-repeat"])
    assert code == 2 and "not both" in capsys.readouterr().err
