"""ExecuTorch (XNNPACK) exporter: vision_encoder.pte, projector.pte and a multi-method llm.pte.

Per component: quantize (torchao, before export) -> trace (torch.export) -> lower (two XNNPACK
partitioners: dynamically quantized linears one op at a time first, then everything else) ->
serialize. Shapes:

* ``vision_encoder.pte``: method ``vision_encoder(pixels[B, 3, S, S]) -> [B, P, C]``, B = the static
  ``encoder_batch`` (XNNPACK plans memory and packs weights once for a static shape; the runtime pads
  the last batch).
* ``projector.pte``: method ``projector(features[F, P, C]) -> [V, H]``, F = config.slowfast.frames
  (the slow-frame indices and pooled token count depend on F, so it is part of the graph); plus
  ``projector_f{N}.pte`` for every extra frame count (``--frames 8,32,128``).
* ``llm.pte``: ``token_embedding(ids[1, T])``, ``text_decoder(embeds[1, T, H], input_pos[1]) -> logits[1, V]``
  with T dynamic in [1, prefill_chunk]: one method, one KV cache for prefill and decode, plus the
  constant methods of sfedge.manifest.CONSTANT_METHODS.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from sfedge.errors import UsageError, env_switch
from sfedge.manifest import (
    CONSTANT_METHODS, METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING, METHOD_VISION_ENCODER, ArtifactEntry, Component,
    TensorSpec,
)
from sfedge.models import SFLlava
from sfedge.quantize.executorch import decoder_options, embedding_table_bytes, quantize_component
from sfedge.quantize.executorch_hqq import use_torchao_hqq
from sfedge.quantize.recipes import Recipe
from sfedge.export.api import EXPORTERS, PART_BY_PART, ExportOptions
from sfedge.export.common import (
    Progress, artifact_entry, build_parts_lazily, model_part, projector_frame_counts, projector_stem, weights_source,
)
from sfedge.export.memory_estimate import side_by_side_peak
from sfedge.export.part_process import PartProcess
from sfedge.memory import available_memory, gib
from sfedge.export.executorch_decompositions import ENV_ALL_DECOMPOSITIONS, skip_noop_decompositions
from sfedge.export.executorch_llm import ATTENTION_FORMS, METHOD_DECODE_FLAT, MODE_OPS, flat_from_position, set_attention_mode, use_custom_ops
from sfedge.export.executorch_vision import nontrivial_ops_outside, trace_vision_encoder

METHOD_PROJECTOR = Component.PROJECTOR.value
TOKENS = "tokens"  # the symbolic sequence dim in the manifest and in torch.export
QUANTIZER = "torchao via executorch.extension.llm.export.quantize.quantize_model_"
VISION_TOOLS = {"8da8w": QUANTIZER, "int8-static": "PT2E: torchao prepare_pt2e/convert_pt2e + XNNPACKQuantizer (calibrated)",
                "fp16": "torch float16 weights and activations inside the XNNPACK delegate"}


def _executorch():
    """The ExecuTorch lowering API, imported lazily (an optional dependency)."""
    try:
        from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.backend.compile_spec_schema import CompileSpec
        from executorch.exir.backend.partitioner import DelegationSpec
        from executorch.exir.passes import MemoryPlanningPass
    except ModuleNotFoundError as exc:
        raise UsageError(f"the ExecuTorch exporter needs {exc.name}: pip install 'sfedge[executorch]'") from None
    return {"ConfigPrecisionType": ConfigPrecisionType, "XnnpackPartitioner": XnnpackPartitioner,
            "EdgeCompileConfig": EdgeCompileConfig, "ExecutorchBackendConfig": ExecutorchBackendConfig,
            "to_edge_transform_and_lower": to_edge_transform_and_lower, "MemoryPlanningPass": MemoryPlanningPass,
            "CompileSpec": CompileSpec, "DelegationSpec": DelegationSpec}


ENV_ALL_PASSES = "SFEDGE_ET_DQ_ALL_PASSES"  # "1": every dynamic-quant linear partition runs XNNPACK's 17 passes
DQ_LINEAR_SPEC = "dqlinear_partitioner"  # XnnpackBackend.preprocess: run only ConvertToLinearPass on the partition


def check_switches() -> None:
    """Refuse (one line) an unknown value of any of the exporter's environment switches."""
    env_switch(ENV_ALL_PASSES, ("1",))
    env_switch(ENV_ALL_DECOMPOSITIONS, ("1",))
    use_torchao_hqq()


def _partitioners(et: dict) -> list:
    """As ExecuTorch's LLM export: dynamic-quant linears one op per partition first (each packed weight is
    freed before the next is packed: lower peak memory), then the rest.

    The dynamic-quant partitioner's partitions carry executorch's ``dqlinear_partitioner`` compile spec, so
    ``XnnpackBackend.preprocess`` runs only ConvertToLinearPass on each (one linear) instead of its 17 passes,
    each a full re-trace of the partition: ~2/3 of the LLM's lowering time (docs/export_memory.md). Same
    delegate payloads (tested); ``SFEDGE_ET_DQ_ALL_PASSES=1`` runs every pass as before."""
    dynamic = et["XnnpackPartitioner"](config_precisions=et["ConfigPrecisionType"].DYNAMIC_QUANT, per_op_mode=True)
    if env_switch(ENV_ALL_PASSES, ("1",)) != "1":
        dynamic.delegation_spec = et["DelegationSpec"](dynamic.delegation_spec.backend_id,
                                                       [et["CompileSpec"](DQ_LINEAR_SPEC, b"")])
    return [dynamic, et["XnnpackPartitioner"]()]


def lower_programs(programs: Dict[str, "torch.export.ExportedProgram"], constant_methods: dict | None = None,
                   per_op_linears: bool = True, share_mutable_buffers: bool = False) -> bytes:
    """Lower torch.export programs (one per method) with XNNPACK into one .pte; returns its bytes. Re-decompositions
    with nothing to decompose are skipped (export/executorch_decompositions.py: same bytes, ~25% less CPU).

    ``per_op_linears=False`` uses one partitioner (fewer, larger partitions: faster to lower, fine for the
    small vision / projector weights). ``share_mutable_buffers``: methods read and write one copy of
    each buffer of the same name (two decoder methods over one KV cache)."""
    et = _executorch()
    partitioners = _partitioners(et) if per_op_linears else [et["XnnpackPartitioner"]()]
    with skip_noop_decompositions():
        edge = et["to_edge_transform_and_lower"](
            programs, partitioner={name: partitioners for name in programs},
            constant_methods=constant_methods or None,
            compile_config=et["EdgeCompileConfig"](_check_ir_validity=False),
        )
    program = edge.to_executorch(et["ExecutorchBackendConfig"](
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,  # quantized embeddings -> ExecuTorch's quantized kernels
        memory_planning_pass=et["MemoryPlanningPass"](alloc_graph_input=False, share_mutable_buffers=share_mutable_buffers),
        **({"emit_mutable_buffer_names": True} if share_mutable_buffers else {}),
    ))
    return program.buffer


def lower_checked(programs: Dict[str, "torch.export.ExportedProgram"]) -> tuple:
    """As ``lower_programs(..., per_op_linears=False)``, also returning method -> {op: count} of the
    non-trivial ops left outside the XNNPACK delegate (run by portable kernels)."""
    et = _executorch()
    with skip_noop_decompositions():
        edge = et["to_edge_transform_and_lower"](
            programs, partitioner={name: [et["XnnpackPartitioner"]()] for name in programs},
            compile_config=et["EdgeCompileConfig"](_check_ir_validity=False))
    outside = {name: nontrivial_ops_outside(edge.exported_program(name)) for name in programs}
    program = edge.to_executorch(et["ExecutorchBackendConfig"](
        extract_delegate_segments=True, memory_planning_pass=et["MemoryPlanningPass"](alloc_graph_input=False)))
    return program.buffer, outside


def _trace(module: nn.Module, args: tuple, dynamic_shapes=None) -> "torch.export.ExportedProgram":
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)


def _quantize(module: nn.Module, component: Component, recipe: Recipe, progress: Progress) -> dict:
    with progress.stage(component.value, "quantize"):
        quantization = quantize_component(module, component.value, recipe.scheme(component))
    return {**quantization, "tool": QUANTIZER if quantization["scheme"] != "fp32" else None}


def _write(folder: Path, file: str, data: bytes, label: str, progress: Progress) -> None:
    with progress.stage(label, "serialize"):
        (folder / file).write_bytes(data)


def export_vision_encoder(model: SFLlava, options: ExportOptions, recipe: Recipe, folder: Path,
                          progress: Progress) -> ArtifactEntry:
    vision = model.config.vision
    component, file = Component.VISION_ENCODER, "vision_encoder.pte"
    batch, size = options.encoder_batch, vision.frame_size
    scheme = recipe.scheme(component)
    with progress.stage(component.value, "quantize + trace"):
        program = trace_vision_encoder(model.vision_encoder, scheme, batch)
    with progress.stage(component.value, "lower"):
        data, outside = lower_checked({METHOD_VISION_ENCODER: program})
    _write(folder, file, data, component.value, progress)
    quantization = {**scheme.to_dict(), "tool": VISION_TOOLS.get(scheme.scheme)}
    return artifact_entry(folder, component.value, file, [TensorSpec("pixels", [batch, 3, size, size], "float32")],
                          [TensorSpec("features", [batch, vision.patches_per_frame, vision.width], "float32")],
                          quantization, METHOD_VISION_ENCODER, encoder_batch=batch,
                          ops_outside_delegate=outside[METHOD_VISION_ENCODER])


def export_projectors(model: SFLlava, options: ExportOptions, recipe: Recipe, folder: Path,
                      progress: Progress) -> List[ArtifactEntry]:
    """One static-shape projector .pte per frame count: ``projector.pte`` for the default count,
    ``projector_f{N}.pte`` for each of ``options.extra_frames``."""
    config = model.config
    component = Component.PROJECTOR
    quantization = _quantize(model.projector, component, recipe, progress)
    entries = []
    for frames in projector_frame_counts(config.slowfast.frames, options.extra_frames):
        label, file = f"{component.value}[{frames} frames]", f"{projector_stem(frames, config.slowfast.frames)}.pte"
        features = torch.zeros(frames, config.vision.patches_per_frame, config.vision.width)
        with progress.stage(label, "trace"):
            program = _trace(model.projector, (features,))
        with progress.stage(label, "lower"):
            data = lower_programs({METHOD_PROJECTOR: program}, per_op_linears=False)
        _write(folder, file, data, label, progress)
        tokens = model.projector.visual_tokens(frames)
        entries.append(artifact_entry(
            folder, component.value, file, [TensorSpec("features", list(features.shape), "float32")],
            [TensorSpec("visual_embeds", [tokens, config.llm.hidden], "float32")], quantization, METHOD_PROJECTOR,
            frames=frames))
    return entries


def constant_methods(model: SFLlava, max_context: int) -> dict:
    llm = model.config.llm
    values = {"get_max_seq_len": max_context, "get_max_context_len": max_context, "get_bos_id": llm.bos_id,
              "get_eos_ids": list(llm.eos_ids), "get_vocab_size": llm.vocab_size, "use_kv_cache": True}
    assert set(values) == set(CONSTANT_METHODS), "keep in step with sfedge.manifest.CONSTANT_METHODS"
    return values


def export_llm(model: SFLlava, options: ExportOptions, recipe: Recipe, folder: Path,
               progress: Progress, layers_quantized: bool = False,
               before_lower: Optional[Callable[[], None]] = None) -> List[ArtifactEntry]:
    """``layers_quantized``: the decoder layers were quantized while they were filled; only the lm_head is left.
    ``before_lower`` runs once the LLM is quantized and traced, just before its lowering."""
    llm = model.config.llm
    file, chunk = "llm.pte", options.prefill_chunk
    embed_q = _quantize(model.token_embedding, Component.TOKEN_EMBEDDING, recipe, progress)
    # Tied embeddings: quantize_ gives each module a new weight, so the lm_head and the token
    # embedding can take different schemes while both start from the one shared tensor.
    decoder_q = _quantize(model.text_decoder.lm_head if layers_quantized else model.text_decoder, Component.TEXT_DECODER,
                          recipe, progress)
    tokens = torch.export.Dim(TOKENS, min=1, max=chunk)
    example = min(2, chunk)
    kv_dtype, attention = decoder_options(recipe.scheme(Component.TEXT_DECODER))
    with progress.stage(Component.TEXT_DECODER.value, "trace"):
        form = ATTENTION_FORMS[attention]  # text_decoder's mode, and an optional T = 1 flat decode method
        use_custom_ops(model.text_decoder, form.prefill, kv_dtype)
        programs = {
            METHOD_TOKEN_EMBEDDING: _trace(model.token_embedding, (torch.zeros(1, example, dtype=torch.long),),
                                           ({1: tokens},)),
            METHOD_TEXT_DECODER: _trace(model.text_decoder, (torch.zeros(1, example, llm.hidden),
                                                             torch.zeros(1, dtype=torch.long)), ({1: tokens}, None)),
        }
        if form.flat:  # + a T = 1 decode method over the same cache
            set_attention_mode(model.text_decoder, form.flat.mode)
            programs[METHOD_DECODE_FLAT] = _trace(model.text_decoder, (torch.zeros(1, 1, llm.hidden),
                                                                       torch.zeros(1, dtype=torch.long)))
    constants = constant_methods(model, options.max_context)
    if before_lower is not None:
        before_lower()
    with progress.stage("llm", "lower"):
        data = lower_programs(programs, constants, share_mutable_buffers=form.flat is not None)
    _write(folder, file, data, "llm", progress)
    shared = dict(max_seq_len=options.max_context, prefill_chunk=chunk, constant_methods=constants)
    methods = (dict(decode_method=METHOD_DECODE_FLAT, decode_method_from_position=flat_from_position(options.max_context, attention))
               if form.flat else {})
    if form.kernels:
        methods["sfedge_kernels"] = True
    embedding = artifact_entry(
        folder, Component.TOKEN_EMBEDDING.value, file, [TensorSpec("token_ids", [1, TOKENS], "int64")],
        [TensorSpec("embeds", [1, TOKENS, llm.hidden], "float32")], embed_q, METHOD_TOKEN_EMBEDDING,
        quantized_kernels=embed_q["scheme"] != "fp32",
        table_bytes=embedding_table_bytes(llm.vocab_size, llm.hidden, recipe.scheme(Component.TOKEN_EMBEDDING)), **shared)
    decoder = artifact_entry(
        folder, Component.TEXT_DECODER.value, file,
        [TensorSpec("inputs_embeds", [1, TOKENS, llm.hidden], "float32"), TensorSpec("input_pos", [1], "int64")],
        [TensorSpec("logits", [1, llm.vocab_size], "float32")], decoder_q, METHOD_TEXT_DECODER,
        attention=f"llama.update_cache + {MODE_OPS[form.prefill]} ({attention})",
        attention_mode=attention, kv_dtype=kv_dtype,
        last_logits_only=True, **methods, **shared)
    return [embedding, decoder]


CHILD_PARTS = ("vision_encoder", "projector")  # exported in a second process beside the LLM when memory allows


def _export_vision_parts(model: SFLlava, options: ExportOptions, recipe: Recipe, folder: Path,
                         progress: Progress) -> List[ArtifactEntry]:
    entries = []
    with model_part(model, "vision_encoder", progress):  # one part's weights alive at a time
        entries.append(export_vision_encoder(model, options, recipe, folder, progress))
    with model_part(model, "projector", progress):
        entries += export_projectors(model, options, recipe, folder, progress)
    return entries


def _export_llm_part(model: SFLlava, options: ExportOptions, recipe: Recipe, folder: Path,
                     progress: Progress, before_lower: Optional[Callable[[], None]] = None) -> List[ArtifactEntry]:
    scheme = recipe.scheme(Component.TEXT_DECODER)
    # each decoder layer is quantized as soon as it is filled: only one layer's float32 weights at a time
    with model_part(model, "llm", progress, on_layer=lambda layer: quantize_component(
            layer, Component.TEXT_DECODER.value, scheme)) as layers_quantized:
        return export_llm(model, options, recipe, folder, progress, layers_quantized, before_lower)


def export_vision_parts_in_child(config, weights, options: ExportOptions, recipe_name: str, folder: Path) -> tuple:
    """The child process's work (export/part_process.py): the vision encoder and projectors of an empty model
    filled from ``weights``, one intra-op thread (the parent's LLM has the other core). Returns the entries and
    the child's stage records and timings."""
    from sfedge.models import build_model
    from sfedge.quantize.recipes import get_recipe

    torch.set_num_threads(1)
    model = build_model(config, weights, options.max_context, fill=False)
    build_parts_lazily(model, weights)
    with Progress(enabled=options.show_progress) as progress:
        entries = _export_vision_parts(model, options, get_recipe("executorch", recipe_name), folder, progress)
    return entries, progress.records, progress.timings


def _vision_beside_llm(model: SFLlava, options: ExportOptions, recipe: Recipe, progress: Progress) -> bool:
    """Whether to export the vision parts in a second process: asked for, two or more cores, the parts are filled
    lazily, and both processes' estimated peaks fit in the memory available (else one process, as before)."""
    if not options.parallel_parts or (os.cpu_count() or 1) < 2 or weights_source(model) is None:
        return False
    needed, available = side_by_side_peak(model, "executorch", recipe.name, CHILD_PARTS), available_memory()
    fits = needed <= available.nbytes
    if progress.enabled:
        where = "a second process, beside the LLM's lowering" if fits else "this process"
        print(f"[export] vision encoder + projectors: {where} "
              f"(both at once need ~{gib(needed)}; {available.describe()})", file=sys.stderr, flush=True)
    return fits


def export_executorch(model: SFLlava, options: ExportOptions, recipe: Recipe, folder: Path,
                      progress: Progress) -> List[ArtifactEntry]:
    if options.prefill_chunk > options.max_context - 1:
        raise UsageError(f"--prefill-chunk {options.prefill_chunk} must be below --max-context {options.max_context}")
    if options.encoder_batch < 1:
        raise UsageError(f"--encoder-batch must be >= 1, got {options.encoder_batch}")
    check_switches()  # before any work (and before a second process starts)
    if not _vision_beside_llm(model, options, recipe, progress):
        return _export_vision_parts(model, options, recipe, folder, progress) + _export_llm_part(model, options, recipe, folder, progress)
    with contextlib.ExitStack() as stack:
        children: List[PartProcess] = []

        def start_vision() -> None:
            # once the LLM is quantized and traced: the child's peak meets the lowering's low start (its memory grows
            # as delegates accumulate), not the quantize stages' peaks, and the lowering (minutes) hides the child's time
            child = stack.enter_context(PartProcess("vision encoder and projector", export_vision_parts_in_child,
                                                    model.config, weights_source(model), options, recipe.name, folder))
            stack.enter_context(progress.beside_child(child.pid))
            children.append(child)

        llm_entries = _export_llm_part(model, options, recipe, folder, progress, before_lower=start_vision)
        vision_entries, records, timings = children[0].result()
    progress.merge(records, timings)
    return vision_entries + llm_entries


EXPORTERS.add("executorch", export_executorch)
PART_BY_PART.add("executorch")
