"""`--backend onnx`: four ONNX graphs named as transformers.js names a VLM's files.

    vision_encoder{sfx}.onnx        pixel_values [batch, 3, S, S] -> image_features [batch, P, C]
    projector{sfx}.onnx             image_features [frames, P, C] -> visual_embeds [V, H]   (frames static;
                                    projector_f{N}{sfx}.onnx for each extra count of --frames 8,32,...)
    embed_tokens{sfx}.onnx          input_ids [1, T] -> inputs_embeds [1, T, H]
    decoder_model_merged{sfx}.onnx  see sfedge.export.onnx_decoder (explicit past/present key-values, in the
                                    KV layout of ExportOptions.kv_layout: gqa-inplace or past-present); a recipe
                                    with a decode scheme (Recipe.decode) adds a second decoder file for T = 1 steps,
                                    recorded as the entry's extra.decode_graph

Each component is traced once with ``torch.onnx.export(dynamo=True)`` into a scratch folder (fp32; the
LLM from stand-ins, its weights written tensor by tensor one layer at a time: sfedge.export.onnx_weights),
then the recipe's scheme for it is applied with ONNX Runtime's tools (sfedge.quantize.onnx) and the
result is written with a precision suffix (``_fp16``, ``_quantized``, ``_q4``, ``_q4f16``); weights
go to ``<file>_data`` when a file would pass 2 GB.
"""
from __future__ import annotations

import gc
import importlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import torch
from torch import nn

from sfedge.errors import SfedgeError
from sfedge.export import onnx_decoder
from sfedge.export.api import EXPORTERS, PART_BY_PART, ExportOptions
from sfedge.export.common import Progress, artifact_entry, model_part, projector_frame_counts, projector_stem, weights_source
from sfedge.export.onnx_weights import LLMWeights, llm_with_stand_ins
from sfedge.manifest import DECODE_GRAPH, ArtifactEntry, Component, DecodeGraph, TensorSpec, path_bytes, sha256_path
from sfedge.models import SFLlava
from sfedge.quantize import onnx as onnx_quant
from sfedge.quantize.recipes import ComponentScheme, Recipe

FILE_STEMS = {Component.VISION_ENCODER: "vision_encoder", Component.PROJECTOR: "projector",
              Component.TOKEN_EMBEDDING: "embed_tokens", Component.TEXT_DECODER: "decoder_model_merged"}
WORK_DIR = ".onnx-work"


@dataclass
class Traceable:
    """One component, ready for torch.onnx.export."""

    component: Component
    module: nn.Module
    args: tuple
    input_names: List[str]
    output_names: List[str]
    dynamic_shapes: object
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    extra: Dict[str, object] = field(default_factory=dict)
    stem: str = ""  # file stem; default: the component's FILE_STEMS entry
    translations: Dict[object, object] = field(default_factory=dict)  # torch.onnx custom_translation_table

    def file_stem(self) -> str:
        return self.stem or FILE_STEMS[self.component]


def _require_onnx_stack() -> None:
    for module in ("onnx", "onnxruntime", "onnxscript"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            raise SfedgeError(f"--backend onnx needs {module}, which is not installed: pip install 'sfedge[onnx]'") from None


def _f32(name: str, shape: Sequence) -> TensorSpec:
    return TensorSpec(name, list(shape), "float32")


def _vision(model: SFLlava, options: ExportOptions) -> Traceable:
    vision = model.config.vision
    batch = max(2, options.encoder_batch)  # a traced size > 1 keeps the batch dimension dynamic
    pixels = torch.zeros(batch, 3, vision.frame_size, vision.frame_size)
    return Traceable(
        Component.VISION_ENCODER, model.vision_encoder, (pixels,), ["pixel_values"], ["image_features"],
        {"pixels": {0: "batch_size"}},
        [_f32("pixel_values", ["batch_size", 3, vision.frame_size, vision.frame_size])],
        [_f32("image_features", ["batch_size", vision.patches_per_frame, vision.width])],
        {"batch": "dynamic", "encoder_batch": options.encoder_batch})


def _projectors(model: SFLlava, options: ExportOptions) -> List[Traceable]:
    """One static-shape projector graph per frame count (the default first)."""
    config = model.config
    patches, width = config.vision.patches_per_frame, config.vision.width
    default = config.slowfast.frames
    return [Traceable(
        Component.PROJECTOR, model.projector, (torch.zeros(frames, patches, width),), ["image_features"],
        ["visual_embeds"], None,
        [_f32("image_features", [frames, patches, width])],
        [_f32("visual_embeds", [model.projector.visual_tokens(frames), config.llm.hidden])],
        {"frames": frames, "slowfast": config.slowfast.spec}, projector_stem(frames, default))
        for frames in projector_frame_counts(default, options.extra_frames)]


def _embedding(model: SFLlava) -> Traceable:
    hidden = model.config.llm.hidden
    return Traceable(
        Component.TOKEN_EMBEDDING, model.token_embedding, (torch.zeros(1, 3, dtype=torch.long),), ["input_ids"],
        ["inputs_embeds"], {"token_ids": {1: "sequence_length"}},
        [TensorSpec("input_ids", [1, "sequence_length"], "int64")], [_f32("inputs_embeds", [1, "sequence_length", hidden])])


def _decoder(model: SFLlava, wrapper: nn.Module, layout: str) -> Traceable:
    llm = model.config.llm
    past, present = onnx_decoder.past_names(llm.layers), onnx_decoder.present_names(llm.layers)
    kv_past = onnx_decoder.kv_dims(layout, llm.kv_heads, onnx_decoder.past_length_name(layout), llm.head_dim)
    kv_present = onnx_decoder.kv_dims(layout, llm.kv_heads, onnx_decoder.present_length_name(layout), llm.head_dim)
    return Traceable(
        Component.TEXT_DECODER, wrapper, onnx_decoder.example_inputs(model.text_decoder, layout),
        [*onnx_decoder.INPUT_NAMES, *past], [onnx_decoder.LOGITS, *present],
        onnx_decoder.dynamic_shapes(llm.layers, layout),
        [_f32("inputs_embeds", [1, "sequence_length", llm.hidden]),
         TensorSpec("attention_mask", [1, "total_sequence_length"], "int64"),
         TensorSpec("position_ids", [1, "sequence_length"], "int64"), *[_f32(name, kv_past) for name in past]],
        [_f32(onnx_decoder.LOGITS, [1, 1, llm.vocab_size]), *[_f32(name, kv_present) for name in present]],
        {"past_inputs": past, "present_outputs": present, "kv_layout": layout,
         "kv_shape": "[{}]".format(", ".join(onnx_decoder.kv_dims(layout, "kv_heads", "sequence", "head_dim", "batch"))), "logits": "last position only",
         "rope_positions": model.text_decoder.max_seq_len},
        translations=onnx_decoder.translation_table(layout))


def _trace(item: Traceable, path: Path, llm: Optional[LLMWeights] = None) -> None:
    """torch.onnx.export (dynamo) into the scratch folder, weights always external there. ``llm``: the module
    holds the LLM's stand-ins; their real tensors are written tensor by tensor as the file is saved."""
    path.with_name(path.name + ".data").unlink(missing_ok=True)  # re-saving appends to an existing data file
    program = torch.onnx.export(
        item.module, item.args, dynamo=True, input_names=item.input_names, output_names=item.output_names,
        dynamic_shapes=item.dynamic_shapes, custom_translation_table=item.translations or None, optimize=True,
        verbose=False)
    if llm is not None:
        llm.bind(program.model.graph)
    program.save(str(path), external_data=True)
    del program
    if llm is not None:
        llm.drop_cache()
    release_rewriter_graphs()


def release_rewriter_graphs() -> int:
    """onnxscript 0.7.2's rewrite rules are module-level objects whose pattern matchers keep the last graph
    they matched (``_graph``, ``_current_node``, ``_match``): after an export, the whole ONNX model with its
    initializers, which wrap the component's torch weights; nothing frees them until the next export.
    Drop those references (a matcher sets them afresh on its next match); returns how many matchers."""
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to release
        return 0
    cleared = 0
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for name in ("_graph", "_current_node", "_match", "_tracer"):
                if name in vars(obj):
                    setattr(obj, name, None)
            cleared += 1
    return cleared


def export_onnx(model: SFLlava, options: ExportOptions, recipe: Recipe, out: Path, progress: Progress) -> List[ArtifactEntry]:
    """Trace all four components to fp32 graphs, then apply the recipe per component.

    The exporter owns ``model``: each part is filled just before its trace and freed after it (see
    export.common.model_part), and once every graph is on disk all weights are dropped (meta device), so
    quantizing a large decoder does not hold the PyTorch copy as well.
    """
    _require_onnx_stack()
    layout = onnx_decoder.check_layout(options.kv_layout)
    calibration = _calibration(model, options, recipe)  # before tracing: a bad --calibration-video fails fast
    out = Path(out)
    work = out / WORK_DIR
    work.mkdir()
    traced: List[Traceable] = []
    try:
        with torch.no_grad():
            with model_part(model, "vision_encoder", progress):  # one part's weights alive at a time
                traced.append(_trace_one(_vision(model, options), work, progress))
            with model_part(model, "projector", progress):
                traced += [_trace_one(item, work, progress) for item in _projectors(model, options)]
            with llm_with_stand_ins(model, weights_source(model), progress) as llm:  # no fp32 LLM resident
                traced.append(_trace_one(_embedding(model), work, progress, llm))
                with onnx_decoder.export_attention(model.text_decoder, layout) as wrapper:
                    traced.append(_trace_one(_decoder(model, wrapper, layout), work, progress, llm))
        release_model(model)
        gc.collect()
        return [_finish(item, recipe, out, work, progress, calibration) for item in traced]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _trace_one(item: Traceable, work: Path, progress: Progress, llm: Optional[LLMWeights] = None) -> Traceable:
    with progress.stage(item.file_stem() if item.component is not Component.TEXT_DECODER else item.component.value, "trace"):
        _trace(item, work / f"{item.file_stem()}.onnx", llm)
    item.module = None  # the traced graph is on disk: hold no reference to the torch weights
    return item


def release_model(model: SFLlava) -> None:
    """Drop every part's torch weights (the graphs are on disk): quantizing a large decoder holds no PyTorch copy."""
    from sfedge.models import PARTS, release_part

    for part in PARTS:
        release_part(model, part)


def _calibration(model: SFLlava, options: ExportOptions, recipe: Recipe) -> Dict[Component, CalibrationSet]:
    """Calibration inputs of the components whose scheme is static (the vision encoder's frames)."""
    scheme = recipe.scheme(Component.VISION_ENCODER)
    if not onnx_quant.needs_calibration(scheme):
        return {}
    from sfedge.quantize.onnx_calibration import calibration_pixels

    frames = int(scheme.options.get("calibration_frames", 8))
    return {Component.VISION_ENCODER: calibration_pixels(model.config.vision, options.calibration_video, frames)}


def _finish(item: Traceable, recipe: Recipe, out: Path, work: Path, progress: Progress,
            calibration: Dict[Component, CalibrationSet]) -> ArtifactEntry:
    component = item.component.value
    scheme = recipe.scheme(item.component)
    stem = item.file_stem()
    file = f"{stem}{onnx_quant.file_suffix(scheme)}.onnx"
    with progress.stage(stem, "quantize"):
        calibration_set = calibration.get(item.component)
        proto = onnx_quant.quantize_model(work / f"{stem}.onnx", scheme, work,
                                          calibration_set.pixels if calibration_set else None)
    with progress.stage(stem, "serialize"):
        data_files = onnx_quant.save_model(proto, out / file)
    inputs, outputs = _with_graph_dtypes(item.inputs, proto.graph.input), _with_graph_dtypes(item.outputs, proto.graph.output)
    del proto
    extra = {**item.extra, **({"calibration": calibration_set.describe()} if calibration_set else {})}
    decode_scheme = recipe.decode_scheme(item.component)
    if decode_scheme is not None:
        extra[DECODE_GRAPH] = _decode_graph(work / f"{stem}.onnx", decode_scheme, out, work, progress, inputs, outputs).to_dict()
    return artifact_entry(out, component, file, inputs, outputs, scheme.to_dict(), data_files=data_files, **extra)


def _decode_graph(src: Path, scheme: ComponentScheme, out: Path, work: Path, progress: Progress,
                  inputs: List[TensorSpec], outputs: List[TensorSpec]) -> DecodeGraph:
    """The component's second graph, for decode steps: the same fp32 graph ``src`` (no second trace) quantized with
    the decode scheme (int4 reads the fp32 weights memory-mapped, one MatMul at a time), written beside the first.
    Its inputs and outputs must be the first graph's, dtypes included: the runtime binds one KV cache to both."""
    stem = src.stem
    file = f"{stem}{onnx_quant.file_suffix(scheme)}.onnx"
    with progress.stage(f"{stem} (decode graph)", "quantize"):
        proto = onnx_quant.quantize_model(src, scheme, work)
    with progress.stage(f"{stem} (decode graph)", "serialize"):
        data_files = onnx_quant.save_model(proto, out / file)
    if (_with_graph_dtypes(inputs, proto.graph.input) != inputs
            or _with_graph_dtypes(outputs, proto.graph.output) != outputs):
        raise SfedgeError(f"{file}: the decode graph's inputs/outputs differ from the prefill graph's (dtypes); "
                          "the two cannot share a KV cache")
    del proto
    return DecodeGraph(file, sha256_path(out / file), path_bytes(out / file), scheme.to_dict(), data_files,
                       {name: sha256_path(out / name) for name in data_files})


def _with_graph_dtypes(specs: List[TensorSpec], values) -> List[TensorSpec]:
    """The specs with the element types the written graph has (fp16 recipes keep a float16 GQA cache)."""
    from onnx import helper

    dtypes = {v.name: str(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)) for v in values}
    return [TensorSpec(spec.name, spec.shape, dtypes.get(spec.name, spec.dtype)) for spec in specs]


if TYPE_CHECKING:
    from sfedge.quantize.onnx_calibration import CalibrationSet

EXPORTERS.add("onnx", export_onnx)
PART_BY_PART.add("onnx")
