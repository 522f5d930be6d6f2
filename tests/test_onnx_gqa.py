"""ONNX decoder KV layouts: GroupQueryAttention with an in-place buffer (default), transformers.js's
past/present and the position-major in-place prefix view (ScatterND + standard-op attention), against the eager model over prefill chunks, decode steps and a rewind; save/load of
the cache (prefix reuse)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'sfedge[onnx]')")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'sfedge[onnx]')")

from sfedge.config import get_preset  # noqa: E402
from sfedge.errors import SfedgeError, UsageError  # noqa: E402
from sfedge.export import onnx_gqa, onnx_prefix  # noqa: E402
from sfedge.export.api import ExportOptions, export_model  # noqa: E402
from sfedge.manifest import read_manifest  # noqa: E402
from sfedge.models import WeightsSource  # noqa: E402
from sfedge.runtime.sessions import SessionOptions, open_session  # noqa: E402

LAYOUTS = ["gqa-inplace", "past-present", "prefix-inplace"]
pytestmark = pytest.mark.xdist_group("onnx_gqa")  # pytest-xdist: one worker makes the module's exports
MAX_CONTEXT, CHUNK, TOL = 128, 32, 1e-4


@pytest.fixture(scope="module")
def folders(export_once):
    """layout -> its tiny fp32 export (shared for the session, read only). gqa-inplace is the default layout:
    the same export as test_onnx.py's fp32 (which also carries a 4-frame projector)."""
    common = dict(max_context=MAX_CONTEXT, prefill_chunk=CHUNK)
    return {"gqa-inplace": export_once("onnx", extra_frames=(4,), **common),
            "past-present": export_once("onnx", kv_layout="past-present", **common),
            "prefix-inplace": export_once("onnx", kv_layout="prefix-inplace", **common)}


def _decoder_graph(folder: Path):
    return onnx.load(str(folder / read_manifest(folder).component("text_decoder").file)).graph


def test_reference_op_matches_sdpa_over_a_growing_buffer():
    """The custom op's PyTorch semantics (what the ONNX node must do): rows written at total - T."""
    torch.manual_seed(0)
    heads, kv_heads, dim, buffer = 4, 2, 16, 12
    past = torch.zeros(1, kv_heads, buffer, dim), torch.zeros(1, kv_heads, buffer, dim)
    q, k, v = torch.randn(1, 3, heads * dim), torch.randn(1, 3, kv_heads * dim), torch.randn(1, 3, kv_heads * dim)
    mask = torch.ones(1, 5, dtype=torch.long)  # 2 cached + 3 new
    out, key, value = onnx_gqa.group_query_attention(q, k, v, *past, mask, heads, kv_heads)
    assert torch.equal(key[0, :, 2:5], k.view(3, kv_heads, dim).transpose(0, 1))
    assert not key[:, :, 5:].any() and out.shape == q.shape


def test_prefix_op_writes_the_last_rows_and_matches_the_gqa_op():
    """prefix_attention over a position-major [1, start + T, Hkv, D] view = group_query_attention over a buffer."""
    torch.manual_seed(0)
    heads, kv_heads, dim, start, tokens = 4, 2, 16, 5, 3
    total = start + tokens
    cached = torch.randn(1, total, kv_heads, dim), torch.randn(1, total, kv_heads, dim)
    q, k, v = torch.randn(1, tokens, heads * dim), torch.randn(1, tokens, kv_heads * dim), torch.randn(1, tokens, kv_heads * dim)
    visible = torch.arange(total)[None, :] <= (start + torch.arange(tokens))[:, None]
    out, key, value = onnx_prefix.prefix_attention(q, k, v, *cached, visible, heads, kv_heads, dim)
    assert torch.equal(key[0, start:], k.view(tokens, kv_heads, dim)) and torch.equal(key[:, :start], cached[0][:, :start])
    buffers = [torch.cat([c.transpose(1, 2), torch.zeros(1, kv_heads, 4, dim)], dim=2) for c in cached]
    expected, _, _ = onnx_gqa.group_query_attention(q, k, v, *buffers, torch.ones(1, total, dtype=torch.long), heads, kv_heads)
    assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_manifest_records_the_layout_and_the_graph_has_one_gqa_node_per_layer(folders, tmp_path):
    layers = get_preset("tiny").llm.layers
    for layout, folder in folders.items():
        entry = read_manifest(folder).component("text_decoder")
        assert entry.extra["kv_layout"] == layout
        ops = Counter(node.op_type for node in _decoder_graph(folder).node)
        past_dim = entry.inputs[3].shape[2]
        if layout == "gqa-inplace":
            assert ops["GroupQueryAttention"] == layers and past_dim == "max_sequence_length"
            assert entry.outputs[1].shape[2] == "max_sequence_length"
        elif layout == "prefix-inplace":  # position-major: [1, start + T, kv_heads, head_dim]
            assert "GroupQueryAttention" not in ops and ops["ScatterND"] == 2 * layers
            assert entry.inputs[3].shape[1] == entry.outputs[1].shape[1] == "total_sequence_length"
            assert entry.extra["kv_shape"] == "[batch, sequence, kv_heads, head_dim]"
        else:
            assert "GroupQueryAttention" not in ops and ops["Concat"] >= 2 * layers and past_dim == "past_sequence_length"
    with pytest.raises(UsageError, match="kv-layout 'ring'.*known: gqa-inplace, past-present"):
        export_model(get_preset("tiny"), WeightsSource(seed=0),
                     ExportOptions(backend="onnx", kv_layout="ring", max_context=MAX_CONTEXT, prefill_chunk=CHUNK,
                                   show_progress=False),
                     tmp_path / "never")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.slow
def test_chunks_decode_and_rewind_match_eager(folders, layout):
    session = open_session(folders[layout], SessionOptions(threads=1))
    eager = open_session(folders[layout], backend="eager")
    assert session.kv_layout == layout
    ids = torch.randint(0, session.config.llm.vocab_size, (CHUNK * 2 + 17,), generator=torch.Generator().manual_seed(1))
    embeds = eager.embed(ids)
    for begin in range(0, embeds.shape[0], CHUNK):  # three chunks: first prompt, then two subsequent ones
        chunk = embeds[begin:begin + CHUNK]
        assert (session.decode(chunk, begin) - eager.decode(chunk, begin)).abs().max().item() <= TOL
    position = embeds.shape[0]
    for step in range(4):
        token = eager.embed(ids[step:step + 1])
        assert (session.decode(token, position) - eager.decode(token, position)).abs().max().item() <= TOL
        position += 1
    # rewind 10 positions: the new tokens overwrite, the old ones past the start are never read again
    position -= 10
    for step in range(3):
        token = eager.embed(ids[40 + step:41 + step])
        assert (session.decode(token, position) - eager.decode(token, position)).abs().max().item() <= TOL
        position += 1
    # a multi-token rewind (a new question after a shared video prefix)
    chunk = embeds[5:25]
    assert (session.decode(chunk, 30) - eager.decode(chunk, 30)).abs().max().item() <= TOL
    with pytest.raises(SfedgeError, match="contiguous"):
        session.decode(token, 60)


@pytest.mark.slow
def test_inplace_buffers_are_the_bound_outputs(folders):
    session = open_session(folders["gqa-inplace"], SessionOptions(threads=1))
    cache = session._cache
    pointers = [value.data_ptr() for value in cache.values]
    embeds = session.embed(torch.arange(20))
    session.decode(embeds, 0)
    key = cache.buffers[0]
    assert key.shape == (1, session.config.llm.kv_heads, MAX_CONTEXT, session.config.llm.head_dim)
    assert np.abs(key[:, :, :20]).sum() > 0 and not key[:, :, 20:].any()  # written by ORT into our numpy buffer
    session.decode(embeds[:1], 20)
    assert np.abs(key[:, :, 20]).sum() > 0 and not key[:, :, 21:].any()
    assert [value.data_ptr() for value in cache.values] == pointers


@pytest.mark.slow
def test_prefix_views_are_written_in_place(folders):
    """prefix-inplace: ORT's ScatterND writes the new rows into the session's own position-major buffers."""
    session = open_session(folders["prefix-inplace"], SessionOptions(threads=1))
    llm = session.config.llm
    key = session._cache.buffers[0]
    assert key.shape == (1, MAX_CONTEXT, llm.kv_heads, llm.head_dim)
    embeds = session.embed(torch.arange(20))
    session.decode(embeds, 0)
    assert np.abs(key[:, :20]).sum() > 0 and not key[:, 20:].any()
    session.decode(embeds[:1], 20)
    assert np.abs(key[:, 20]).sum() > 0 and not key[:, 21:].any()
    before = key[:, :21].copy()
    session.decode(embeds[1:2], 21)
    assert np.array_equal(key[:, :21], before)  # earlier rows untouched by a step


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.slow
def test_save_reset_load_continues_like_no_save(folders, layout):
    folder = folders[layout]
    session = open_session(folder, SessionOptions(threads=1))
    llm = session.config.llm
    ids = torch.randint(0, llm.vocab_size, (CHUNK + 9,), generator=torch.Generator().manual_seed(2))
    prompt, token = session.embed(ids), session.embed(ids[:1])
    length = prompt.shape[0]
    session.decode(prompt[:CHUNK], 0)
    session.decode(prompt[CHUNK:], CHUNK)
    saved = session.save_kv(length)
    assert sorted(saved) == sorted(f"layer{i}.{kind}" for i in range(llm.layers) for kind in ("key", "value"))
    assert saved["layer0.key"].shape == (1, llm.kv_heads, length, llm.head_dim)
    expected = session.decode(token, length)  # continuing without save
    session.reset()
    session.load_kv(saved, length)
    assert torch.equal(session.decode(token, length), expected)
    other = open_session(folders[LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]], SessionOptions(threads=1))
    other.load_kv(saved, length)  # the names and shapes are the same in every layout
    assert (other.decode(token, length) - expected).abs().max().item() <= TOL
    with pytest.raises(SfedgeError, match="cache holds"):
        session.save_kv(MAX_CONTEXT)
    with pytest.raises(SfedgeError, match="has no layer0.key"):
        session.load_kv({}, length)
    with pytest.raises(SfedgeError, match="shape"):
        session.load_kv({**saved, "layer1.value": saved["layer1.value"][:, :1]}, length)
