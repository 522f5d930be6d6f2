"""ONNX: the LLM traced from stand-ins (no float32 LLM resident) writes the graphs a trace of the filled model writes."""
from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'sfedge[onnx]')")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install 'sfedge[onnx]')")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from sfedge.config import get_preset  # noqa: E402
from sfedge.errors import SfedgeError  # noqa: E402
from sfedge.export import onnx_decoder  # noqa: E402
from sfedge.export.common import Progress  # noqa: E402
from sfedge.export.onnx import _decoder, _embedding, _trace  # noqa: E402
from sfedge.export.onnx_weights import (  # noqa: E402
    STAND_IN_MAX_REAL, FilledTensors, HeldTensors, LLMWeights, StandIn, _transposed, llm_with_stand_ins, make_stand_in,
)
from sfedge.models import LLMFiller, WeightsSource, build_model, empty_model  # noqa: E402

LAYOUT = onnx_decoder.GQA_INPLACE


def _resident_bytes(*modules) -> int:
    """Bytes of the distinct storages behind the modules' parameters (a stand-in's is one row)."""
    storages = {}
    for module in modules:
        for param in module.parameters():
            if not param.is_meta:
                storages[param.untyped_storage().data_ptr()] = param.untyped_storage().nbytes()
    return sum(storages.values())


def _graph(path):
    """initializer name -> (dims, sha256 of the values); the nodes without metadata (it holds source paths)."""
    model = onnx.load(str(path))
    inits = {t.name: (tuple(t.dims), hashlib.sha256(numpy_helper.to_array(t, base_dir=str(path.parent)).tobytes()).hexdigest())
             for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        del copy.metadata_props[:]
        nodes.append(copy.SerializeToString(deterministic=True))
    return inits, nodes


def _trace_llm(model, folder, llm=None):
    folder.mkdir()
    _trace(_embedding(model), folder / "embed_tokens.onnx", llm)
    with onnx_decoder.export_attention(model.text_decoder, LAYOUT) as wrapper:
        _trace(_decoder(model, wrapper, LAYOUT), folder / "decoder_model_merged.onnx", llm)


def _sources(tmp_path):
    """(config, weights) pairs: random weights tied and untied, and a Hugging Face checkpoint (untied)."""
    tiny = get_preset("tiny")
    yield tiny, WeightsSource(seed=4)
    yield tiny.replace(llm=dataclasses.replace(tiny.llm, tie_embeddings=False)), WeightsSource(seed=4)
    pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    from test_hf_reference import make_hf_qwen2

    make_hf_qwen2(tmp_path, tie=False)
    yield tiny, WeightsSource(llm_dir=str(tmp_path))


def test_filler_gives_any_unit_in_any_order_the_tensors_of_the_whole_build(tmp_path):
    for config, weights in _sources(tmp_path):
        whole_model = build_model(config, weights, 64)
        whole = dict(whole_model.named_parameters(remove_duplicate=False))
        real = FilledTensors(empty_model(config, weights, 64), weights)
        last = whole_model.config.llm.layers - 1
        names = [f"text_decoder.layers.{last}.mlp.up_proj.weight",  # the last layer first: the stream skips the others
                 "text_decoder.layers.0.self_attn.q_proj.weight", "text_decoder.layers.0.self_attn.k_proj.bias",  # back
                 "token_embedding.embed_tokens.weight", "text_decoder.norm.weight",
                 f"text_decoder.layers.{last}.input_layernorm.weight"]
        if not whole_model.config.llm.tie_embeddings:
            names.insert(1, "text_decoder.lm_head.weight")
        for name in names:  # the unit: text_decoder.layers.N, token_embedding, or text_decoder (norm, lm_head)
            assert torch.equal(real.get(name), whole[name]), (weights, name)
            unit = ".".join(name.split(".")[:3]) if ".layers." in name else name.split(".")[0]
            resident = [n for n, p in real.scratch.named_parameters() if not p.is_meta]
            assert resident and all(n.startswith(unit) for n in resident), (name, resident)  # one unit at a time
        real.drop_cache()
        assert all(p.is_meta for p in real.scratch.parameters())


def test_stand_ins_are_small_shared_by_tied_weights_and_refuse_an_unknown_view():
    model = build_model(get_preset("tiny"), WeightsSource(seed=1), 64)
    embedding = model.token_embedding.embed_tokens.weight
    llm = LLMWeights(HeldTensors({}))
    both = torch.nn.Module()
    both.token_embedding, both.text_decoder = model.token_embedding, model.text_decoder
    llm.replace(both, "")
    assert model.text_decoder.lm_head.weight is model.token_embedding.embed_tokens.weight  # still tied
    names = {s.name for s in llm.stand_ins.values()}
    assert "token_embedding.embed_tokens.weight" in names and "text_decoder.lm_head.weight" not in names
    assert "text_decoder.layers.0.self_attn.q_proj.bias" not in names  # small tensors stay real
    assert _resident_bytes(model.token_embedding) == embedding.shape[1] * 4
    stand_in = make_stand_in(torch.Size([8, 200]), torch.float32)
    record = StandIn("w", (8, 200), stand_in)
    array = stand_in.numpy()
    assert _transposed("a", _Shaped(array.T), array.T.strides, record) is True
    assert _transposed("b", _Shaped(array), array.strides, record) is False
    with pytest.raises(SfedgeError, match="other than as is or transposed"):
        _transposed("c", _Shaped(array[:, :100]), (0, 8), record)
    assert STAND_IN_MAX_REAL >= 1024  # onnx_ir's deduplication compares initializers of up to 1,024 values


class _Shaped:
    def __init__(self, array):
        self.shape = array.shape


@pytest.mark.slow
def test_llm_traced_from_stand_ins_holds_no_float32_llm_and_writes_the_filled_models_graphs(tmp_path):
    config = get_preset("tiny")
    weights = WeightsSource(seed=7)
    with torch.no_grad():
        whole = build_model(config, weights, 64)
        fp32_bytes = _resident_bytes(whole.token_embedding, whole.text_decoder)
        _trace_llm(whole, tmp_path / "filled")
        model = empty_model(config, weights, 64)
        with Progress(enabled=False) as progress, llm_with_stand_ins(model, weights, progress) as llm:
            resident = _resident_bytes(model.token_embedding, model.text_decoder)
            assert resident < 0.1 * fp32_bytes, (resident, fp32_bytes)  # the LLM's fp32 weights are not resident
            assert len(llm.stand_ins) == 1 + 7 * config.llm.layers  # the table and every layer's matrices
            _trace_llm(model, tmp_path / "stand_ins", llm)
        assert all(p.is_meta for p in model.text_decoder.parameters())  # released on exit
    for file in ("embed_tokens.onnx", "decoder_model_merged.onnx"):
        want_inits, want_nodes = _graph(tmp_path / "filled" / file)
        got_inits, got_nodes = _graph(tmp_path / "stand_ins" / file)
        assert got_inits == want_inits, file
        assert got_nodes == want_nodes, file
