"""Vision and projector checkpoints: HF SigLIP keys (outside reference), timm/Oryx keys, LLaVA keys."""
import pytest
import torch
from safetensors.torch import save_file

from sfedge.config import get_preset
from sfedge.errors import SfedgeError
from sfedge.models import WeightsSource, build_model


def test_hf_siglip_checkpoint_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the outside reference")
    vision = get_preset("tiny").vision  # patch 16, 64x64 frames: a 4x4 grid
    hf_config = transformers.SiglipVisionConfig(
        hidden_size=vision.width, intermediate_size=vision.mlp_dim, num_hidden_layers=vision.depth,
        num_attention_heads=vision.heads, image_size=vision.frame_size, patch_size=vision.patch_size,
        hidden_act="gelu", layer_norm_eps=1e-6)  # Oryx-ViT uses exact GELU
    torch.manual_seed(0)
    reference = transformers.SiglipVisionModel(hf_config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0, 0.1)
    reference.save_pretrained(tmp_path)
    config = get_preset("tiny").replace(vision=type(vision)(**{**vision.__dict__, "pos_grid": 4}))
    ours = build_model(config, WeightsSource(vision_path=str(tmp_path)), max_seq_len=16)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]  # before post_layernorm
        got = ours.vision_encoder(pixels)
    assert (got - expected).abs().max().item() <= 1e-4


def test_oryx_timm_keys_with_prefix_round_trip(tmp_path, tiny_model, tiny_config):
    state = {f"model.vision_tower.vision_tower.{k}": v.contiguous() for k, v in tiny_model.vision_encoder.state_dict().items()}
    state["model.vision_tower.vision_tower.head.weight"] = torch.zeros(3)  # heads are dropped
    save_file(state, str(tmp_path / "oryx.safetensors"))
    other = build_model(tiny_config, WeightsSource(seed=9, vision_path=str(tmp_path / "oryx.safetensors")), max_seq_len=16)
    pixels = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(other.vision_encoder(pixels), tiny_model.vision_encoder(pixels))


def test_llava_projector_keys(tmp_path, tiny_model, tiny_config):
    state = {f"model.mm_projector.{k[len('mlp.'):]}": v for k, v in tiny_model.projector.state_dict().items()}
    save_file(state, str(tmp_path / "projector.safetensors"))
    other = build_model(tiny_config, WeightsSource(seed=9, projector_path=str(tmp_path / "projector.safetensors")), max_seq_len=16)
    features = torch.randn(8, 16, 64)
    torch.testing.assert_close(other.projector(features), tiny_model.projector(features))


def test_projector_of_wrong_width_is_a_clear_error(tmp_path, tiny_config):
    save_file({"mm_projector.0.weight": torch.zeros(64, 32), "mm_projector.0.bias": torch.zeros(64),
               "mm_projector.2.weight": torch.zeros(64, 64), "mm_projector.2.bias": torch.zeros(64)},
              str(tmp_path / "p.safetensors"))
    with pytest.raises(SfedgeError, match=r"projector tensor 'mlp.0.weight' in .*p.safetensors has shape \(64, 32\), the model expects \(64, 64\)"):
        build_model(tiny_config, WeightsSource(projector_path=str(tmp_path / "p.safetensors")), max_seq_len=16)


def test_pickle_and_corrupt_checkpoints_are_refused(tmp_path, tiny_config):
    pickle_file = tmp_path / "vision.bin"
    pickle_file.write_bytes(b"not a safetensors file")
    with pytest.raises(SfedgeError, match="not a .safetensors file"):
        build_model(tiny_config, WeightsSource(vision_path=str(pickle_file)))
    corrupt = tmp_path / "vision.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(SfedgeError, match="not a readable safetensors file"):
        build_model(tiny_config, WeightsSource(vision_path=str(corrupt)))


def test_fingerprint_covers_checkpoint_bytes(tmp_path, tiny_model):
    path = tmp_path / "projector.safetensors"
    save_file({k: v for k, v in tiny_model.projector.state_dict().items()}, str(path))
    first = WeightsSource(projector_path=str(path)).fingerprint()
    save_file({k: v + 1 for k, v in tiny_model.projector.state_dict().items()}, str(path))
    assert WeightsSource(projector_path=str(path)).fingerprint() != first
    assert WeightsSource(seed=1).fingerprint() != WeightsSource(seed=2).fingerprint()
