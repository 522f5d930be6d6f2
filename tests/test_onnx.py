"""ONNX backend: every recipe exported once (tiny preset), checked as files, in plain ONNX Runtime,
against the eager model (run_parity with the recipe's tolerance) and through OnnxRuntimeSession."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'sfedge[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'sfedge[onnx]')")

from sfedge.errors import SfedgeError  # noqa: E402
from sfedge.quantize import onnx_int8_channel as int8_channel  # noqa: E402
from sfedge.manifest import Component, read_manifest  # noqa: E402
from sfedge.models import WeightsSource, build_model  # noqa: E402
from sfedge.quantize import onnx as onnx_quant  # noqa: E402
from sfedge.quantize.recipes import recipe_names  # noqa: E402
from sfedge.runtime.generate import prefill  # noqa: E402
from sfedge.runtime.parity import run_parity  # noqa: E402
from sfedge.runtime.sessions import SessionOptions, open_session  # noqa: E402
from sfedge.runtime.sessions.eager import EagerSession  # noqa: E402

RECIPES = ["fp32", "fp16", "int8", "int4", "int4-vision-static", "q4f16", "int8-channel", "int8-channel-q4decode"]
MAX_CONTEXT, CHUNK = 128, 32
STEMS = {"vision_encoder": "vision_encoder", "projector": "projector", "token_embedding": "embed_tokens",
         "text_decoder": "decoder_model_merged"}
# op that proves a scheme was applied, per scheme
SCHEME_OPS = {"int8": {"MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear"},
              "int8-static": {"QuantizeLinear", "DequantizeLinear"},
              "int4": {"MatMulNBits", "GatherBlockQuantized"}, "q4f16": {"MatMulNBits"},
              "int8-channel": {"DynamicQuantizeMatMul"}}


def test_every_registered_recipe_is_tested():
    assert sorted(recipe_names("onnx")) == sorted(RECIPES)


@pytest.fixture(scope="module")
def export_dir(export_once):
    """recipe -> its tiny export (shared for the session, read only); fp32 also carries a 4-frame projector."""
    def get(recipe: str) -> Path:
        return export_once("onnx", recipe, max_context=MAX_CONTEXT, prefill_chunk=CHUNK,
                           extra_frames=(4,) if recipe == "fp32" else ())

    return get


def _ops(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _plain_feeds(session, manifest, tokens: int, past: int = 0) -> dict:
    llm = manifest.model_config["llm"]
    rng = np.random.default_rng(0)
    feeds = {"inputs_embeds": rng.standard_normal((1, tokens, llm["hidden"])).astype(np.float32),
             "attention_mask": np.ones((1, past + tokens), dtype=np.int64),
             "position_ids": np.arange(past, past + tokens, dtype=np.int64)[None]}
    types = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in session.get_inputs()}
    for name in manifest.component("text_decoder").extra["past_inputs"]:  # float16 in fp16 recipes' GQA graphs
        feeds[name] = np.zeros((1, llm["kv_heads"], past, llm["head_dim"]), dtype=types[name])
    return feeds


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.slow
def test_files_are_valid_and_run_in_plain_onnxruntime(export_dir, recipe):
    folder = export_dir(recipe)
    manifest = read_manifest(folder)
    assert manifest.backend == "onnx" and manifest.recipe == recipe
    assert not (folder / ".onnx-work").exists()
    suffix = onnx_quant.FILE_SUFFIX
    for entry in manifest.components:
        path = folder / entry.file
        stem = STEMS[entry.component] + (f"_f{entry.extra['frames']}" if entry.extra.get("frames", 8) != 8 else "")
        assert entry.file == f"{stem}{suffix[entry.quantization['scheme']]}.onnx"
        onnx.checker.check_model(str(path))  # path-based: also follows external data
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [t.name for t in entry.inputs]
        assert [o.name for o in session.get_outputs()] == [t.name for t in entry.outputs]
    decoder = ort.InferenceSession(str(folder / manifest.component("text_decoder").file), providers=["CPUExecutionProvider"])
    llm = manifest.model_config["llm"]
    # one graph: prefill with an empty past, then a decode step on the presents
    outputs = decoder.run(None, _plain_feeds(decoder, manifest, tokens=5))
    assert outputs[0].shape == (1, 1, llm["vocab_size"])
    assert outputs[1].shape == (1, llm["kv_heads"], 5, llm["head_dim"])
    feeds = _plain_feeds(decoder, manifest, tokens=1, past=5)
    feeds.update(zip(manifest.component("text_decoder").extra["past_inputs"], outputs[1:]))
    step = decoder.run(None, feeds)
    assert step[1].shape == (1, llm["kv_heads"], 6, llm["head_dim"]) and np.isfinite(step[0]).all()


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.slow
def test_parity_with_eager_within_recipe_tolerance(export_dir, recipe):
    report = run_parity(export_dir(recipe), steps=16)
    assert report.passed, report.table()
    if recipe == "fp32":
        assert all(row.max_abs <= 1e-4 for row in report.rows), report.table()


@pytest.mark.parametrize("recipe", ["int8", "int4", "int4-vision-static", "q4f16", "fp16", "int8-channel", "int8-channel-q4decode"])
@pytest.mark.slow
def test_quantization_is_applied(export_dir, recipe):
    folder, baseline = export_dir(recipe), export_dir("fp32")
    manifest, reference = read_manifest(folder), read_manifest(baseline)
    for entry in manifest.components:
        scheme = entry.quantization["scheme"]
        if scheme == "fp32":
            continue
        assert entry.bytes < reference.component(entry.component).bytes, entry.file
        ops = _ops(folder / entry.file)
        if scheme == "fp16":
            weights = onnx.load(str(folder / entry.file)).graph.initializer
            assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in weights), entry.file
        else:
            assert ops.keys() & SCHEME_OPS[scheme], (entry.file, ops)
    decoder_ops = _ops(folder / manifest.component("text_decoder").file)
    expected = {"int8": "MatMulInteger", "int4": "MatMulNBits", "int4-vision-static": "MatMulNBits",
                "q4f16": "MatMulNBits", "fp16": "MatMul", "int8-channel": "DynamicQuantizeMatMul",
                "int8-channel-q4decode": "DynamicQuantizeMatMul"}[recipe]  # its decode graph: test_onnx_q4decode.py
    assert decoder_ops[expected] >= 7 * 2, decoder_ops  # q, k, v, o, gate, up, down per layer


@pytest.mark.slow
def test_static_int8_vision_encoder_is_calibrated_and_close_to_fp32(export_dir, tmp_path):
    from sfedge.quantize.onnx_calibration import calibration_pixels
    from sfedge.runtime.video import load_video, make_demo_video, preprocess

    folder = export_dir("int4-vision-static")
    entry = read_manifest(folder).component("vision_encoder")
    assert entry.file == "vision_encoder_int8.onnx" and entry.extra["calibration"] == {"frames": 8, "source": "synthetic"}
    ops = _ops(folder / entry.file)
    assert ops["QuantizeLinear"] >= 4 and ops["DequantizeLinear"] >= ops["QuantizeLinear"]
    # the weight matmuls are quantized, attention's activation x activation products stay float
    assert sum(1 for node in onnx.load(str(folder / entry.file)).graph.node if node.op_type == "MatMul") >= 2
    session = open_session(folder, SessionOptions(threads=1))
    config = session.config
    eager = EagerSession(build_model(config, WeightsSource(seed=0), MAX_CONTEXT))
    video = make_demo_video(tmp_path / "clip.mp4", seconds=2, fps=8, size=96)  # real codec frames, not the calibration set
    pixels = preprocess(load_video(video, config.vision.frame_size, 4).frames, config.vision.pixel_mean, config.vision.pixel_std)
    cosine = torch.nn.functional.cosine_similarity(session.encode(pixels).flatten(1), eager.encode(pixels).flatten(1), dim=1)
    assert cosine.min().item() >= 0.99, cosine
    from_video = calibration_pixels(config.vision, str(video), 3)
    assert from_video.pixels.shape == (3, 3, config.vision.frame_size, config.vision.frame_size)
    assert from_video.describe() == {"frames": 3, "source": str(video)}
    with pytest.raises(SfedgeError, match="does not exist|not found|no such"):
        calibration_pixels(config.vision, str(tmp_path / "missing.mp4"))
    with pytest.raises(SfedgeError, match="needs calibration inputs"):
        onnx_quant.quantize_model(export_dir("fp32") / "vision_encoder.onnx", onnx_quant.INT8_STATIC, tmp_path)


@pytest.mark.slow
def test_int4_embedding_is_block_quantized(export_dir):
    manifest = read_manifest(export_dir("int4"))
    entry = manifest.component("token_embedding")
    assert entry.file == "embed_tokens_q4.onnx" and entry.quantization["group_size"] == 32
    assert _ops(export_dir("int4") / entry.file)["GatherBlockQuantized"] == 1


@pytest.mark.slow
def test_prompt_longer_than_one_chunk_and_rewind(export_dir):
    folder = export_dir("fp32")
    session = open_session(folder, SessionOptions(threads=1))
    eager = open_session(folder, backend="eager")
    assert session.max_prefill_chunk == CHUNK and session.max_context == MAX_CONTEXT
    ids = torch.randint(0, session.config.llm.vocab_size, (CHUNK * 2 + 17,))
    embeds = eager.embed(ids)
    got, ref = prefill(session, embeds), prefill(eager, embeds)
    assert (got - ref).abs().max().item() <= 1e-4
    step = eager.embed(ids[:1])
    position = embeds.shape[0]
    for _ in range(3):
        got, ref = session.decode(step, position), eager.decode(step, position)
        assert (got - ref).abs().max().item() <= 1e-4
        position += 1
    # an earlier start position truncates the cache: same logits as the first decode step
    eager.reset()
    prefill(eager, embeds)
    assert (session.decode(step, embeds.shape[0]) - eager.decode(step, embeds.shape[0])).abs().max().item() <= 1e-4
    with pytest.raises(SfedgeError, match="contiguous"):
        session.decode(step, embeds.shape[0] + 5)
    with pytest.raises(SfedgeError, match="prefill-chunk"):
        session.decode(embeds[: CHUNK + 1], 0)
    with pytest.raises(SfedgeError, match="max-context"):
        session.decode(step, MAX_CONTEXT)


@pytest.mark.slow
def test_session_options_and_projector_frames(export_dir):
    folder = export_dir("fp32")
    with pytest.raises(SfedgeError, match="not available"):
        open_session(folder, SessionOptions(provider="NoSuchExecutionProvider"))
    session = open_session(folder, SessionOptions(threads=1))
    vision = session.graphs[Component.VISION_ENCODER.value].session
    assert vision.get_providers() == ["CPUExecutionProvider"]
    assert vision.get_session_options().intra_op_num_threads == 1
    config = session.config
    assert session.frame_counts == (8, 4)  # the fp32 export carries an extra 4-frame projector
    assert read_manifest(folder).projectors()[4].file == "projector_f4.onnx"
    eager = EagerSession(build_model(config, WeightsSource(seed=0), MAX_CONTEXT))
    features = torch.randn(4, config.vision.patches_per_frame, config.vision.width)
    assert (session.project(features) - eager.project(features)).abs().max().item() <= 1e-4
    features = torch.zeros(session.frames + 1, config.vision.patches_per_frame, config.vision.width)
    with pytest.raises(SfedgeError, match="projectors for 8,4 frames, not 9"):
        session.project(features)
    # the vision graph's batch is dynamic: 3 frames in one call
    assert session.encode(torch.zeros(3, 3, config.vision.frame_size, config.vision.frame_size)).shape[0] == 3


@pytest.mark.slow
def test_external_data_is_rewritten_not_appended(export_dir, tmp_path):
    source = export_dir("fp32") / "decoder_model_merged.onnx"
    target = tmp_path / "decoder_model_merged.onnx"
    proto = onnx.load(str(source))
    assert onnx_quant.save_model(proto, target, threshold=0) == ["decoder_model_merged.onnx_data"]
    data = tmp_path / "decoder_model_merged.onnx_data"
    size = data.stat().st_size
    assert size > target.stat().st_size
    onnx_quant.save_model(onnx.load(str(source)), target, threshold=0)  # a second save must not grow the data file
    assert data.stat().st_size == size
    onnx.checker.check_model(str(target))
    manifest = read_manifest(export_dir("fp32"))
    inline = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    external = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    feeds = _plain_feeds(inline, manifest, tokens=4)
    np.testing.assert_array_equal(inline.run(None, feeds)[0], external.run(None, feeds)[0])
    assert onnx_quant.save_model(onnx.load(str(source)), target) == [] and not data.exists()  # small again: inline


def test_unknown_scheme_is_refused():
    from sfedge.quantize.recipes import ComponentScheme

    with pytest.raises(SfedgeError, match="known: fp32"):
        onnx_quant.file_suffix(ComponentScheme("int3"))


@pytest.mark.slow
def test_parity_fails_for_an_artifact_that_is_not_its_model(export_dir, tmp_path):
    """A silent break must not pass: the fp32 files checked against another seed's eager model."""
    import json
    import shutil

    from sfedge.cli import main

    folder = tmp_path / "mismatched"
    shutil.copytree(export_dir("fp32"), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["weights"]["seed"] = manifest["weights"]["seed"] + 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SfedgeError, match="changed since export"):  # the recorded fingerprint no longer matches
        run_parity(folder, steps=8)
    assert main(["parity", str(folder), "--steps", "4"]) == 1
    # a manifest consistently rewritten to name another model (fingerprint too) still fails on the numbers
    from sfedge.models import WeightsSource

    manifest["weights"]["fingerprint"] = WeightsSource.from_dict(manifest["weights"]).fingerprint()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    report = run_parity(folder, steps=8)
    assert not report.passed and not any(row.passed for row in report.rows)
    assert main(["parity", str(folder), "--steps", "4"]) == 1


@pytest.mark.slow
def test_run_picks_an_exported_frame_count_or_says_which_exist(export_dir, tmp_path, capsys):
    from sfedge.cli import main
    from sfedge.runtime.video import make_demo_video

    folder = export_dir("fp32")
    video = make_demo_video(tmp_path / "clip.mp4", seconds=2, fps=8, size=64)
    assert main(["run", str(folder), "--video", str(video), "--prompt", "hi", "--frames", "4",
                 "--max-new-tokens", "2"]) == 0
    assert "frames 4 |" in capsys.readouterr().err
    assert main(["run", str(folder), "--video", str(video), "--prompt", "hi", "--frames", "5"]) == 1
    assert "projectors for 8,4 frames, not 5" in capsys.readouterr().err


def _external_weights_model(folder: Path, rows: int = 64, cols: int = 96, vocab: int = 80) -> Path:
    """x @ W1 @ W2 plus a Gather table, all weights as external data beside the file (as _trace saves)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((rows, cols), dtype=np.float32),
               "w2": rng.standard_normal((cols, rows), dtype=np.float32),
               "table": rng.standard_normal((vocab, rows), dtype=np.float32)}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, rows])],
                              [numpy_helper.from_array(value, name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = folder / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    return path


def test_int4_reads_matmul_weights_memory_mapped_and_matches_a_full_load(tmp_path, monkeypatch):
    """The int4 decoder path (weights left on disk, MatMul weights memory-mapped by the quantizer, never loaded
    into the proto) writes exactly what the quantizer writes from a fully loaded model, and runs."""
    from onnx import external_data_helper

    from sfedge.quantize.recipes import ComponentScheme

    path = _external_weights_model(tmp_path)
    scheme = ComponentScheme("int4", 32, {"ops": ("MatMul", "Gather"), "symmetric": True, "accuracy_level": 4})
    reference = onnx_quant._to_int4(onnx.load(str(path)), scheme)
    loaded = []
    load = external_data_helper.load_external_data_for_tensor
    monkeypatch.setattr(external_data_helper, "load_external_data_for_tensor",
                        lambda tensor, base_dir: (loaded.append(tensor.name), load(tensor, base_dir)))
    frugal = onnx_quant.quantize_model(path, scheme, tmp_path)
    assert "table" in loaded and not {"w1", "w2"} & set(loaded)  # Gather loads its table; MatMuls map theirs
    assert [n.op_type for n in frugal.graph.node] == [n.op_type for n in reference.graph.node] == \
        ["GatherBlockQuantized", "MatMulNBits", "MatMulNBits"]
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in reference.graph.initializer}
    assert {t.name for t in frugal.graph.initializer} == set(initializers)
    for tensor in frugal.graph.initializer:
        assert not external_data_helper.uses_external_data(tensor)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), initializers[tensor.name])
    session = ort.InferenceSession(frugal.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"ids": np.array([[0, 5, 79]])})[0].shape == (1, 3, 64)


def test_int8_channel_weights_round_per_column_in_row_steps():
    weight = np.random.default_rng(1).standard_normal((37, 5)).astype(np.float32)
    weight[:, 3] = 0.0  # an all-zero column: scale 1, values 0
    quantized, scale = int8_channel.int8_channel_weights(weight, rows_per_step=8)
    expected_scale = np.abs(weight).max(axis=0) / 127.0
    expected_scale[3] = 1.0
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-7)
    np.testing.assert_array_equal(quantized, np.clip(np.rint(weight / expected_scale), -127, 127).astype(np.int8))
    assert quantized.dtype == np.int8 and np.abs(quantized).max(axis=0)[[0, 1, 2, 4]].tolist() == [127] * 4
    whole, _ = int8_channel.int8_channel_weights(weight, rows_per_step=1000)
    np.testing.assert_array_equal(quantized, whole)


def test_int8_channel_maps_matmul_weights_and_runs_close_to_fp32(tmp_path, monkeypatch):
    """int8-channel: each MatMul -> DynamicQuantizeMatMul with int8 weights read through a read-only memory map
    (never loaded into the proto), the Gather table left float32 and loaded; ORT runs it within int8 error."""
    from onnx import external_data_helper

    from sfedge.quantize.recipes import ComponentScheme

    path = _external_weights_model(tmp_path)
    full = onnx.load(str(path))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in full.graph.initializer}
    loaded = []
    load = external_data_helper.load_external_data_for_tensor
    monkeypatch.setattr(external_data_helper, "load_external_data_for_tensor",
                        lambda tensor, base_dir: (loaded.append(tensor.name), load(tensor, base_dir)))
    maps = []
    memmap = np.memmap
    monkeypatch.setattr(np, "memmap", lambda *args, **kwargs: (maps.append(kwargs.get("mode")), memmap(*args, **kwargs))[1])
    model = onnx_quant.quantize_model(path, ComponentScheme("int8-channel", options={"ops": ("MatMul",)}), tmp_path)
    assert loaded == ["table"] and maps == ["r", "r"]
    assert [n.op_type for n in model.graph.node] == ["Gather", "DynamicQuantizeMatMul", "DynamicQuantizeMatMul"]
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert initializers["w1_q8"].dtype == np.int8 and initializers["w1_q8_scale"].shape == (96,) and "w1" not in initializers
    ids = np.array([[0, 5, 79]])
    want = weights["table"][ids] @ weights["w1"] @ weights["w2"]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()
    with pytest.raises(SfedgeError, match="int8-channel quantizes MatMul only, not Gather"):
        onnx_quant.quantize_model(path, ComponentScheme("int8-channel", options={"ops": ("MatMul", "Gather")}), tmp_path)
