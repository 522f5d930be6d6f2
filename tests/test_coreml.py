"""Core ML backends on the tiny preset: conversion, the package spec, compression really applied,
the module swap's numerics in PyTorch, and the Linux refusal of the Core ML session.

Core ML prediction exists only on macOS 15+; on Linux the numbers of the converted packages cannot
be computed (coremltools has no MIL interpreter), so numerics are checked on the swapped PyTorch
module that is exported, and run_parity runs only on macOS.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("coremltools")

from sfedge.config import get_preset  # noqa: E402
from sfedge.errors import SfedgeError, UsageError  # noqa: E402
from sfedge.manifest import Component, read_manifest, verify_artifacts  # noqa: E402
from sfedge.models import WeightsSource, build_model  # noqa: E402
from sfedge.quantize.coreml import INT4, INT8, PALETTIZE4, check_target  # noqa: E402
from sfedge.quantize.recipes import INT4_TOLERANCE, Recipe, get_recipe, uniform  # noqa: E402

MAX_CONTEXT, CHUNK = 128, 16
FOLDERS_GROUP = pytest.mark.xdist_group("coreml_fp16_int4")  # pytest-xdist: one worker makes and reads the two exports
ON_MACOS = sys.platform == "darwin"


@pytest.fixture(scope="module")
def fp16_folder(export_once):
    """The tiny preset's Core ML fp16 export (conftest's export_once: made once per run, read only)."""
    return export_once("coreml", "fp16", max_context=MAX_CONTEXT, prefill_chunk=CHUNK)


@pytest.fixture(scope="module")
def int4_folder(export_once):
    return export_once("coreml", "int4", max_context=MAX_CONTEXT, prefill_chunk=CHUNK)


@pytest.fixture(scope="module")
def prefill_mlmodel():
    """The prefill function of the tiny LLM converted once (uncompressed), for the other compressions."""
    from sfedge.export.coreml import FN_PREFILL, llm_ports
    from sfedge.export.coreml_convert import convert, export_program
    from sfedge.export.coreml_llm import DecoderStep, use_masked_cache

    config = get_preset("tiny")
    model = build_model(config, WeightsSource(seed=0), MAX_CONTEXT)
    use_masked_cache(model.text_decoder)
    inputs, outputs = llm_ports(config.llm.hidden, config.llm.vocab_size, CHUNK)[FN_PREFILL]
    return convert(export_program(DecoderStep(model.text_decoder), inputs), inputs, outputs, "iOS18")


def _spec(path: Path):
    from sfedge.export.coreml_convert import load_spec

    return load_spec(path)


def _ops(path: Path, function: str | None = None) -> dict:
    from sfedge.export.coreml_convert import mil_op_types

    return mil_op_types(path, function)


def _blob_offsets(path: Path) -> dict:
    """function -> offsets into weight.bin its constants read (equal offsets = one stored copy)."""
    offsets: dict = {}
    for name, function in _spec(path).mlProgram.functions.items():
        for block in function.block_specializations.values():
            for op in block.operations:
                values = [a for a in op.attributes.values()]
                values += [arg.value for i in op.inputs.values() for arg in i.arguments if arg.HasField("value")]
                for value in values:
                    if value.HasField("blobFileValue"):
                        offsets.setdefault(name, set()).add(value.blobFileValue.offset)
    return offsets


@pytest.mark.slow
@FOLDERS_GROUP
def test_llm_package_is_one_multifunction_stateful_model(fp16_folder):
    config = get_preset("tiny").llm
    manifest = read_manifest(fp16_folder)
    verify_artifacts(fp16_folder, manifest)
    decoder = manifest.component(Component.TEXT_DECODER)
    assert decoder.file == manifest.component(Component.TOKEN_EMBEDDING).file == "llm.mlpackage"
    spec = _spec(fp16_folder / "llm.mlpackage")
    assert spec.specificationVersion >= 9  # iOS18
    assert spec.description.defaultFunctionName == "decode"
    functions = {f.name: f for f in spec.description.functions}
    assert set(functions) == {"embed", "prefill", "decode"}
    state_shape = [1, config.kv_heads, MAX_CONTEXT, config.head_dim]
    for name in ("prefill", "decode"):
        states = functions[name].state
        assert len(states) == 2 * config.layers
        assert all(list(s.type.stateType.arrayType.shape) == state_shape for s in states)
        tokens = CHUNK if name == "prefill" else 1
        inputs = {i.name: list(i.type.multiArrayType.shape) for i in functions[name].input}
        assert inputs == {"inputs_embeds": [1, tokens, config.hidden], "input_pos": [1], "last_index": [1]}
        assert [o.name for o in functions[name].output] == ["logits"]
    assert [s.name for s in functions["prefill"].state] == [s.name for s in functions["decode"].state]
    assert not functions["embed"].state
    assert [s["name"] for s in decoder.extra["states"]] == [s.name for s in functions["decode"].state]
    ops = _ops(fp16_folder / "llm.mlpackage", "decode")
    # coreml_update_state is serialized as write_state (+ a read_state of the written value)
    assert ops["write_state"] == 2 * config.layers and ops["read_state"] >= 2 * config.layers
    assert "scaled_dot_product_attention" in ops


@pytest.mark.slow
@FOLDERS_GROUP
def test_weights_are_stored_once_across_functions(fp16_folder):
    offsets = _blob_offsets(fp16_folder / "llm.mlpackage")
    # prefill and decode read the same linear weights; embed's table is lm_head's (tied embeddings)
    assert len(offsets["prefill"] & offsets["decode"]) >= 0.9 * len(offsets["decode"])
    assert offsets["embed"] and offsets["embed"] <= offsets["prefill"]
    model = build_model(get_preset("tiny"), WeightsSource(seed=0), MAX_CONTEXT)
    unique_fp16 = 2 * sum(p.numel() for p in model.text_decoder.parameters())  # tied table counted once
    weight_bin = fp16_folder / "llm.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    assert weight_bin.stat().st_size < 1.2 * unique_fp16


@pytest.mark.slow
@FOLDERS_GROUP
def test_static_packages_spec(fp16_folder):
    config = get_preset("tiny")
    manifest = read_manifest(fp16_folder)
    vision = _spec(fp16_folder / "vision_encoder.mlpackage").description
    assert list(vision.input[0].type.multiArrayType.shape) == [1, 3, config.vision.frame_size, config.vision.frame_size]
    assert list(vision.output[0].type.multiArrayType.shape) == [1, config.vision.patches_per_frame, config.vision.width]
    projector = _spec(fp16_folder / "projector.mlpackage").description
    assert list(projector.input[0].type.multiArrayType.shape)[0] == config.slowfast.frames
    assert manifest.component(Component.PROJECTOR).outputs[0].shape == list(projector.output[0].type.multiArrayType.shape)
    for name in ("vision_encoder.mlpackage", "projector.mlpackage", "llm.mlpackage"):
        assert not any(op.startswith("constexpr") for op in _ops(fp16_folder / name))


@pytest.mark.slow
@FOLDERS_GROUP
def test_reading_a_spec_leaves_the_package_untouched(fp16_folder, tmp_path):
    """coremltools.utils.load_spec rewrites Manifest.json (its ModelPackage's destructor, through a temp file): ours
    reads the same spec without writing, so inspecting a folder never changes the artifacts it verifies."""
    from sfedge.export.coreml_convert import coremltools

    for name in ("vision_encoder.mlpackage", "projector.mlpackage", "llm.mlpackage"):
        package = fp16_folder / name
        before = [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(package.rglob("*"))]
        ours = _spec(package)
        assert [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(package.rglob("*"))] == before
        copy = shutil.copytree(package, tmp_path / name)
        manifest_inode = (copy / "Manifest.json").stat().st_ino
        assert ours == coremltools().utils.load_spec(str(copy))
        assert (copy / "Manifest.json").stat().st_ino != manifest_inode  # what ours avoids: the manifest rewritten


@pytest.mark.slow
@FOLDERS_GROUP
def test_int4_recipe_is_really_applied(fp16_folder, int4_folder):
    manifest = read_manifest(int4_folder)
    decoder = manifest.component(Component.TEXT_DECODER).quantization
    assert decoder["scheme"] == "int4" and decoder["compressed_weights"] == 5 * get_preset("tiny").llm.layers + 1
    ops = _ops(int4_folder / "llm.mlpackage", "decode")
    assert ops.get("constexpr_blockwise_shift_scale", 0) == decoder["compressed_weights"]
    assert "constexpr_blockwise_shift_scale" in _ops(int4_folder / "vision_encoder.mlpackage")  # int8 per channel
    fp16_manifest = read_manifest(fp16_folder)
    for component in (Component.TEXT_DECODER, Component.VISION_ENCODER):
        assert manifest.component(component).bytes < 0.75 * fp16_manifest.component(component).bytes
    offsets = _blob_offsets(int4_folder / "llm.mlpackage")
    assert offsets["embed"] <= offsets["prefill"]  # the int4 table is still shared with lm_head


@pytest.mark.parametrize("scheme, op", [(INT8, "constexpr_blockwise_shift_scale"), (PALETTIZE4, "constexpr_lut_to_dense"),
                                        (INT4, "constexpr_blockwise_shift_scale")])
@pytest.mark.slow
@pytest.mark.xdist_group("coreml_prefill_mlmodel")  # one worker converts the module's prefill_mlmodel once
def test_compression_ops_and_size(prefill_mlmodel, tmp_path, scheme, op):
    from collections import Counter

    from sfedge.quantize.coreml import compress

    model, applied = compress(prefill_mlmodel, scheme, ("linear",))
    ops = Counter(o.op_type for f in model._mil_program.functions.values() for o in f.operations)
    # q, o, gate, up, down per layer + lm_head; tiny k/v projections (2,048 values) sit at coremltools' threshold
    assert ops[op] == applied["compressed_weights"] == 5 * get_preset("tiny").llm.layers + 1
    # RoPE tables feed gathers, not linears: they stay fp16 constants
    names = {o.outputs[0].name for f in model._mil_program.functions.values() for o in f.operations if o.op_type == op}
    assert not any("rope" in n for n in names)
    prefill_mlmodel.save(str(tmp_path / "plain.mlpackage"))
    model.save(str(tmp_path / "compressed.mlpackage"))
    weights = "Data/com.apple.CoreML/weights/weight.bin"
    ratio = (tmp_path / "compressed.mlpackage" / weights).stat().st_size / (tmp_path / "plain.mlpackage" / weights).stat().st_size
    assert ratio < (0.7 if scheme is INT8 else 0.45)


def test_deployment_target_rules_checked_in_one_place():
    recipe = Recipe("int4-all", "coreml", "test", uniform(INT4), INT4_TOLERANCE)
    targets = {c.value: "iOS18" for c in Component}
    check_target(recipe, targets)
    with pytest.raises(UsageError, match="needs Core ML deployment target iOS18"):
        check_target(recipe, {**targets, Component.VISION_ENCODER.value: "iOS17"})
    check_target(get_recipe("coreml", "int8"), {c.value: "iOS16" for c in Component})
    with pytest.raises(UsageError, match="unknown Core ML deployment target"):
        check_target(recipe, {Component.PROJECTOR.value: "iOS12"})


def test_masked_cache_swap_matches_eager_with_padding():
    """The exported module (swapped attention, padded prefill chunk, decode steps) against the eager model."""
    from sfedge.export.coreml_llm import DecoderStep, MaskedCacheAttention, use_masked_cache

    config = get_preset("tiny")
    reference = build_model(config, WeightsSource(seed=0), MAX_CONTEXT).text_decoder
    model = build_model(config, WeightsSource(seed=0), MAX_CONTEXT)
    assert use_masked_cache(model.text_decoder) == config.llm.layers
    assert all(isinstance(layer.self_attn.attend, MaskedCacheAttention) for layer in model.text_decoder.layers)
    step = DecoderStep(model.text_decoder)
    prompt = torch.randn(1, CHUNK + 5, config.llm.hidden, generator=torch.Generator().manual_seed(1))
    i32 = lambda v: torch.tensor([v], dtype=torch.int32)  # noqa: E731
    with torch.no_grad():
        expected = reference(prompt, torch.tensor([0]))
        step(prompt[:, :CHUNK], i32(0), i32(CHUNK - 1))
        tail = torch.zeros(1, CHUNK, config.llm.hidden)
        tail[:, :5] = prompt[:, CHUNK:]
        got = step(tail, i32(CHUNK), i32(4))
        assert (expected - got).abs().max() < 1e-2  # the cache is fp16, as in Core ML
        assert torch.equal(expected.argmax(-1), got.argmax(-1))
        for position in range(CHUNK + 5, CHUNK + 12):
            token = torch.randn(1, 1, config.llm.hidden)
            assert (reference(token, torch.tensor([position])) - step(token, i32(position), i32(0))).abs().max() < 1e-2


@pytest.mark.skipif(ON_MACOS, reason="on macOS the session runs; see test_parity_on_macos")
@pytest.mark.slow
@FOLDERS_GROUP
def test_session_refuses_on_linux_with_the_alternative(fp16_folder):
    from sfedge.runtime.sessions import open_session

    with pytest.raises(SfedgeError, match=r"needs macOS 15\+.*--backend executorch") as info:
        open_session(fp16_folder)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not ON_MACOS, reason="Core ML prediction (and MLState) needs macOS 15+")
@pytest.mark.slow
@FOLDERS_GROUP
def test_parity_on_macos(fp16_folder, int4_folder):
    from sfedge.runtime.parity import run_parity

    for folder in (fp16_folder, int4_folder):
        report = run_parity(folder)
        assert report.passed, report.table()


@pytest.mark.slow
def test_executorch_coreml_pte_delegates_every_method(export_once):
    pytest.importorskip("executorch")
    from executorch.exir._serialize._program import deserialize_pte_binary

    folder = export_once("executorch-coreml", "fp16", max_context=MAX_CONTEXT, prefill_chunk=CHUNK)
    manifest = read_manifest(folder)
    verify_artifacts(folder, manifest)
    program = deserialize_pte_binary((folder / "model.pte").read_bytes()).program
    delegates = {plan.name: [d.id for d in plan.delegates] for plan in program.execution_plan}
    assert set(delegates) == {c.value for c in Component}
    assert all(ids == ["CoreMLBackend"] for ids in delegates.values())
    assert {e.method for e in manifest.components} == set(delegates)
    assert all(e.extra["take_over_mutable_buffer"] is False for e in manifest.components)


@pytest.mark.parametrize("manifest, message", [
    (None, "cannot read the package manifest"),
    ("{not json", "not a Core ML package manifest"),
    ('{"rootModelIdentifier": "a", "itemInfoEntries": {}}', "not a Core ML package manifest"),
    ('{"rootModelIdentifier": "a", "itemInfoEntries": {"a": {"path": "../../etc/passwd"}}}', "leaves the package"),
    ('{"rootModelIdentifier": "a", "itemInfoEntries": {"a": {"path": "com.apple.CoreML/model.mlmodel"}}}',
     "model.mlmodel: not a readable Core ML model spec"),
])
def test_a_broken_package_is_one_line_naming_the_file(tmp_path, manifest, message):
    from sfedge.export.coreml_convert import load_spec

    package = tmp_path / "vision_encoder.mlpackage"
    (package / "Data/com.apple.CoreML").mkdir(parents=True)
    if manifest is not None:
        (package / "Manifest.json").write_text(manifest)
    with pytest.raises(UsageError, match=message) as info:
        load_spec(package)
    assert "vision_encoder.mlpackage" in str(info.value) and "\n" not in str(info.value)
