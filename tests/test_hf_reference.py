"""Outside reference: a tiny Qwen2 built with transformers, saved with save_pretrained, loaded
through sfedge's loader and compared with transformers' Qwen2ForCausalLM."""
import json

import pytest
import torch

from sfedge.config import get_preset
from sfedge.errors import SfedgeError
from sfedge.models import WeightsSource, build_model

transformers = pytest.importorskip("transformers", reason="transformers is the outside reference (pip install -e .[dev])")


def make_hf_qwen2(folder, tie=True, max_shard_size=None):
    config = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=1024, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=[2, 0])
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial values everywhere, biases included, and peaked logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.8, 1.2)
            elif "embed_tokens" in name:
                param.normal_(0, 0.4)
            else:
                param.normal_(0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2")
    reference = make_hf_qwen2(folder)
    ours = build_model(get_preset("tiny"), WeightsSource(llm_dir=str(folder)), max_seq_len=128)
    return reference, ours, folder


def test_prefill_logits_match_transformers(hf_pair):
    reference, ours, _ = hf_pair
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        ours.text_decoder.last_logits_only = False
        try:
            ours.text_decoder.reset_cache()
            got = ours.text_decoder(ours.token_embedding(ids), torch.tensor([0]))
        finally:
            ours.text_decoder.last_logits_only = True
    assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_decode_matches_transformers(hf_pair):
    reference, ours, _ = hf_pair
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    decoder = ours.text_decoder
    decoder.reset_cache()
    with torch.no_grad():
        logits = decoder(ours.token_embedding(ids), torch.tensor([0]))[0]
        sequence = ids[0].tolist()
        worst = 0.0
        for step in range(16):
            expected = reference(input_ids=torch.tensor([sequence])).logits[0, -1]  # no cache: full recompute
            worst = max(worst, (logits - expected).abs().max().item())
            assert int(logits.argmax()) == int(expected.argmax())
            token = int(expected.argmax())
            sequence.append(token)
            logits = decoder(ours.token_embedding(torch.tensor([[token]])), torch.tensor([len(sequence) - 1]))[0]
    assert worst <= 1e-4


def test_config_json_is_authoritative_and_ties_share_memory(hf_pair):
    _, ours, folder = hf_pair
    assert ours.config.llm.eos_ids == (2, 0)
    assert ours.text_decoder.lm_head.weight.data_ptr() == ours.token_embedding.embed_tokens.weight.data_ptr()


def test_sharded_untied_checkpoint_loads(tmp_path):
    reference = make_hf_qwen2(tmp_path, tie=False, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = build_model(get_preset("tiny"), WeightsSource(llm_dir=str(tmp_path)), max_seq_len=64)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        expected = reference(input_ids=ids).logits[0, -1]
        got = ours.text_decoder(ours.token_embedding(ids), torch.tensor([0]))[0]
    assert (got - expected).abs().max().item() <= 1e-4
    assert ours.text_decoder.lm_head.weight.data_ptr() != ours.token_embedding.embed_tokens.weight.data_ptr()


def test_wrong_shape_names_tensor_file_and_shapes(tmp_path):
    make_hf_qwen2(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96  # the config lies about the checkpoint
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SfedgeError, match=r"mlp\.(gate|up|down)_proj\.weight.*model\.safetensors.*\(128, 64\).*\(96, 64\)|"
                                          r"mlp\.(gate|up|down)_proj\.weight.*model\.safetensors.*\(64, 128\).*\(64, 96\)"):
        build_model(get_preset("tiny"), WeightsSource(llm_dir=str(tmp_path)), max_seq_len=16)


def test_missing_llm_folder_and_config(tmp_path):
    with pytest.raises(SfedgeError, match="does not exist"):
        build_model(get_preset("tiny"), WeightsSource(llm_dir=str(tmp_path / "nope")))
    with pytest.raises(SfedgeError, match="config.json is missing"):
        build_model(get_preset("tiny"), WeightsSource(llm_dir=str(tmp_path)))
