"""ONNX recipe int8-channel-q4decode: two decoder graphs over one KV cache (int8-channel for prefill chunks, int4
block 128 for decode steps). Fast: the manifest record and its verification, the simulator's routing. Slow (real
tiny exports, both in-place layouts): which graph runs which call, rewinds, save/load, parity, a missing file."""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from sfedge.config import get_preset
from sfedge.errors import SfedgeError
from sfedge.manifest import DECODE_GRAPH, Component, decode_graph, manifest_files, read_manifest, verify_artifacts
from sfedge.models import WeightsSource
from sfedge.quantize import onnx_simulate
from sfedge.quantize.onnx import INT4_DECODE_MATMUL, INT8_CHANNEL_MATMUL
from sfedge.quantize.recipes import get_recipe
from sfedge.runtime.sessions.eager import EagerSession
from artifact_folders import FILES, _entry, _folder, _manifest, _own_cache, _sha  # noqa: F401 (_own_cache: autouse fixture)

RECIPE = "int8-channel-q4decode"
LAYOUTS = ["gqa-inplace", "prefix-inplace"]
MAX_CONTEXT, CHUNK = 128, 32  # test_onnx.py's options: the int8-channel export is shared with it
DECODE_FILE = "decoder_model_merged_q4.onnx"


def test_recipe_is_int8_channel_for_prefill_and_int4_block_128_for_decode():
    recipe = get_recipe("onnx", RECIPE)
    assert recipe.scheme(Component.TEXT_DECODER) == INT8_CHANNEL_MATMUL
    assert recipe.decode_scheme(Component.TEXT_DECODER) == INT4_DECODE_MATMUL
    assert (INT4_DECODE_MATMUL.scheme, INT4_DECODE_MATMUL.group_size) == ("int4", 128)
    assert INT4_DECODE_MATMUL.options["accuracy_level"] == 4 and INT4_DECODE_MATMUL.options["symmetric"]
    assert recipe.decode_scheme(Component.VISION_ENCODER) is None
    assert get_recipe("onnx", "int8-channel").decode_scheme(Component.TEXT_DECODER) is None


# --- the manifest record (fast) -----------------------------------------------------------------------------------

def _with_decode_graph(tmp_path: Path, record: dict) -> tuple[Path, object]:
    files = {**FILES, DECODE_FILE: b"int4 decoder" * 20}
    manifest = _manifest(files=files)
    decoder = manifest.component(Component.TEXT_DECODER)
    decoder.extra[DECODE_GRAPH] = record
    folder = _folder(tmp_path, manifest)
    (folder / DECODE_FILE).write_bytes(files[DECODE_FILE])
    return folder, manifest


def _record(**overrides) -> dict:
    return {"file": DECODE_FILE, "sha256": _sha(b"int4 decoder" * 20), "bytes": 240,
            "quantization": INT4_DECODE_MATMUL.to_dict(), "data_files": [], "data_sha256": {}, **overrides}


def test_manifest_names_the_decode_graph_and_verifies_its_hash(tmp_path):
    folder, manifest = _with_decode_graph(tmp_path, _record())
    graph = decode_graph(manifest.component(Component.TEXT_DECODER))
    assert graph.file == DECODE_FILE and graph.quantization["group_size"] == 128
    names = {item.name: item.what for item in manifest_files(manifest)}
    assert names[DECODE_FILE] == "decode graph of component text_decoder"
    verify_artifacts(folder, read_manifest(folder), use_cache=False)
    (folder / DECODE_FILE).write_bytes(b"changed")
    with pytest.raises(SfedgeError, match=f"{DECODE_FILE} does not match the sha256.*decode graph"):
        verify_artifacts(folder, read_manifest(folder), use_cache=False)
    (folder / DECODE_FILE).unlink()
    with pytest.raises(SfedgeError, match=f"{DECODE_FILE} is missing: the manifest names it as decode graph"):
        verify_artifacts(folder, read_manifest(folder), use_cache=False)


def test_decode_graph_data_files_are_verified_and_old_entries_have_none(tmp_path):
    record = _record(data_files=[DECODE_FILE + "_data"], data_sha256={DECODE_FILE + "_data": _sha(b"w")})
    folder, manifest = _with_decode_graph(tmp_path, record)
    names = {item.name: item.what for item in manifest_files(manifest)}
    assert names[DECODE_FILE + "_data"] == "data file of the decode graph of component text_decoder"
    with pytest.raises(SfedgeError, match=f"{DECODE_FILE}_data is missing"):
        verify_artifacts(folder, read_manifest(folder), use_cache=False)
    assert decode_graph(_entry("text_decoder", "decoder_model_merged.onnx", "x")) is None  # folders before the recipe


def test_the_bench_costs_a_decode_step_with_the_decode_graph_bytes(tmp_path):
    from types import SimpleNamespace

    from sfedge.benchmarks.worker import artifact_info

    folder, manifest = _with_decode_graph(tmp_path, _record())
    pipeline = SimpleNamespace(session=SimpleNamespace(manifest=manifest, backend="onnx"))
    sizes, step_bytes, _ = artifact_info(pipeline, str(folder))
    prefill_bytes = len(FILES["decoder_model_merged.onnx"]) + len(FILES["decoder_model_merged.onnx_data"])
    assert step_bytes == len(b"int4 decoder" * 20)  # a step reads the decode graph, not the prefill graph
    assert sizes["text_decoder"] == prefill_bytes + step_bytes  # the folder holds both


@pytest.mark.parametrize("record", [{"file": DECODE_FILE}, _record(data_files="x.onnx_data"), ["not", "a", "mapping"]])
def test_malformed_decode_graph_record_is_one_line_error(tmp_path, record):
    entry = _entry("text_decoder", "decoder_model_merged.onnx", "x", **{DECODE_GRAPH: record})
    with pytest.raises(SfedgeError, match="text_decoder: decode_graph") as error:
        decode_graph(entry)
    assert "\n" not in str(error.value)


# --- the simulated recipe (fast): T > 1 calls get int8-channel's rounding, T = 1 calls int4 block 128's ----------

def _eager(simulate) -> EagerSession:
    session = EagerSession.build(get_preset("tiny"), WeightsSource(seed=0), max_context=64)
    simulate(session.model.text_decoder)
    return session


def test_simulator_routes_chunks_to_int8_channel_and_steps_to_int4():
    both = _eager(lambda m: onnx_simulate.simulate_two_graphs(m, INT8_CHANNEL_MATMUL, INT4_DECODE_MATMUL))
    int8 = _eager(lambda m: onnx_simulate.simulate_component(m, INT8_CHANNEL_MATMUL))
    int4 = _eager(lambda m: onnx_simulate.simulate_component(m, INT4_DECODE_MATMUL))
    embeds = both.embed(torch.arange(1, 12))
    assert torch.equal(both.decode(embeds[:10], 0), int8.decode(embeds[:10], 0))  # a chunk: int8-channel
    int8.decode(embeds[:10], 0)
    int4.load_kv(int8.save_kv(10), 10)  # the chunk's cache, then one step of the int4 model
    step = both.decode(embeds[10:11], 10)
    assert torch.equal(step, int4.decode(embeds[10:11], 10))
    assert (step - int8.decode(embeds[10:11], 10)).abs().max() > 1e-3  # the two roundings do differ
    assert torch.equal(both.decode(embeds[:10], 0), int8.decode(embeds[:10], 0))  # a chunk again after a step


# --- real tiny exports (slow) --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(export_once):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'sfedge[onnx]')")
    common = dict(max_context=MAX_CONTEXT, prefill_chunk=CHUNK)
    return {"gqa-inplace": export_once("onnx", RECIPE, **common),
            "prefix-inplace": export_once("onnx", RECIPE, kv_layout="prefix-inplace", **common)}


def _one_graph_copy(folder: Path, target: Path, decode_graph_file: bool) -> Path:
    """A copy of ``folder`` whose decoder is one graph: the prefill file (int8-only) or the decode file (int4-only)."""
    shutil.copytree(folder, target)
    manifest = read_manifest(target)
    entry = manifest.component(Component.TEXT_DECODER)
    graph = decode_graph(entry)
    if decode_graph_file:
        entry.file, entry.sha256, entry.quantization = graph.file, graph.sha256, graph.quantization
    del entry.extra[DECODE_GRAPH]
    manifest.write(target)
    return target


def _ops(path: Path) -> Counter:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.slow
def test_export_writes_both_graphs_from_one_trace(folders, export_once):
    import onnx

    folder = folders["gqa-inplace"]
    entry = read_manifest(folder).component(Component.TEXT_DECODER)
    graph = decode_graph(entry)
    assert entry.file == "decoder_model_merged_q8.onnx" and graph.file == DECODE_FILE
    as_json = lambda scheme: json.loads(json.dumps(scheme.to_dict()))  # noqa: E731 (tuples become lists)
    assert graph.quantization == as_json(INT4_DECODE_MATMUL) and entry.quantization == as_json(INT8_CHANNEL_MATMUL)
    assert {"DynamicQuantizeMatMul"} <= set(_ops(folder / entry.file)) and "MatMulNBits" not in _ops(folder / entry.file)
    step_ops = _ops(folder / graph.file)
    assert step_ops["MatMulNBits"] > 0 and "DynamicQuantizeMatMul" not in step_ops and "MatMul" not in step_ops
    blocks = {attr.i for node in onnx.load(str(folder / graph.file)).graph.node if node.op_type == "MatMulNBits"
              for attr in node.attribute if attr.name == "block_size"}
    assert blocks == {128}
    prefill, step = onnx.load(str(folder / entry.file)).graph, onnx.load(str(folder / graph.file)).graph
    assert [str(v) for v in prefill.input] == [str(v) for v in step.input]
    assert [str(v) for v in prefill.output] == [str(v) for v in step.output]
    # the prefill graph is int8-channel's decoder, byte for byte (the same fp32 graph, the same pass)
    int8_channel = read_manifest(export_once("onnx", "int8-channel", max_context=MAX_CONTEXT, prefill_chunk=CHUNK))
    assert entry.sha256 == int8_channel.component(Component.TEXT_DECODER).sha256
    assert graph.bytes < entry.bytes


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.slow
def test_chunks_run_the_int8_graph_steps_the_int4_graph_and_rewinds_save_load_hold(folders, layout, tmp_path):
    from sfedge.runtime.sessions import SessionOptions, open_session

    folder = folders[layout]
    options = SessionOptions(threads=1)
    both = open_session(folder, options)
    int8 = open_session(_one_graph_copy(folder, tmp_path / "int8", False), options)
    int4 = open_session(_one_graph_copy(folder, tmp_path / "int4", True), options)
    assert both.kv_layout == int8.kv_layout == int4.kv_layout == layout
    ids = torch.randint(0, both.config.llm.vocab_size, (CHUNK + 8 + 3,), generator=torch.Generator().manual_seed(3))
    embeds = both.embed(ids)
    prompt, tokens = embeds[:CHUNK + 8], embeds[CHUNK + 8:]
    length = prompt.shape[0]
    chunk_logits = {}
    for name, session in (("both", both), ("int8", int8), ("int4", int4)):
        session.decode(prompt[:CHUNK], 0)
        chunk_logits[name] = session.decode(prompt[CHUNK:], CHUNK)
    assert torch.equal(chunk_logits["both"], chunk_logits["int8"])  # chunks: the int8 graph
    assert (chunk_logits["both"] - chunk_logits["int4"]).abs().max() > 1e-3
    saved = both.save_kv(length)
    step = both.decode(tokens[:1], length)  # a step: the int4 graph over the int8 graph's cache
    int4.load_kv(saved, length)
    assert torch.equal(step, int4.decode(tokens[:1], length))
    assert (step - int8.decode(tokens[:1], length)).abs().max() > 1e-3
    # more steps, then a rewind of two positions: the same as a session that never saw the dropped tokens
    both.decode(tokens[1:2], length + 1)
    both.decode(tokens[2:3], length + 2)
    rewound = both.decode(tokens[2:3], length + 1)
    fresh = open_session(folder, options)
    fresh.load_kv(saved, length)
    fresh.decode(tokens[:1], length)
    assert torch.equal(rewound, fresh.decode(tokens[2:3], length + 1))
    # a chunk at an earlier position (a new question after a shared prefix) runs the int8 graph again
    int8.decode(prompt[:CHUNK], 0)
    assert torch.equal(both.decode(prompt[5:25], 20), int8.decode(prompt[5:25], 20))
    # save, reset, load: decoding continues exactly as without the round trip
    both.reset()
    both.load_kv(saved, length)
    assert torch.equal(both.decode(tokens[:1], length), step)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.slow
def test_parity_compares_both_graphs_and_fails_when_decode_is_simulated_as_int8(folders, layout, monkeypatch):
    from sfedge.runtime import parity

    report = parity.run_parity(folders[layout], steps=16)
    assert report.passed, report.table()
    rows = {row.component: row for row in report.rows}
    assert rows["text_decoder[prefill graph]"].cosine >= 0.99, report.table()  # the int8 graph's own bound
    assert any("steps 1..16 ran the decode graph" in note for note in report.notes), report.notes
    # the gate can tell the graphs apart: simulating int8-channel for the decode steps too fails it
    one_graph = dataclasses.replace(get_recipe("onnx", RECIPE), decode={})
    monkeypatch.setattr(parity, "get_recipe", lambda backend, name: one_graph)
    wrong = parity.run_parity(folders[layout], steps=16)
    assert not wrong.passed and any("KL vs eager" in failure for failure in wrong.failures), wrong.table()


@pytest.mark.slow
def test_missing_decode_file_is_a_one_line_error_naming_it(folders, tmp_path):
    from sfedge.runtime.sessions import SessionOptions, open_session

    folder = tmp_path / "copy"
    shutil.copytree(folders["gqa-inplace"], folder)
    (folder / DECODE_FILE).unlink()
    for verify in (True, False):
        with pytest.raises(SfedgeError, match=DECODE_FILE) as error:
            open_session(folder, SessionOptions(threads=1, verify=verify))
        assert "\n" not in str(error.value)
