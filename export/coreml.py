"""``--backend coreml``: three static-shape .mlpackage files converted with coremltools.

- ``vision_encoder.mlpackage``: pixels [encoder_batch, 3, S, S] -> features [encoder_batch, P, C].
- ``projector.mlpackage``: features [frames, P, C] -> visual embeddings [visual tokens, H]
  (plus ``projector_f{N}.mlpackage`` for each extra count of ``--frames 8,32,...``).
- ``llm.mlpackage``: ONE multifunction model (iOS18) with weights stored once:
  ``embed`` (token ids [1, prefill_chunk] -> embeddings), ``prefill`` (embeddings [1, prefill_chunk, H],
  input_pos, last_index -> logits [1, V]) and ``decode`` (one token). ``prefill`` and ``decode`` share
  the KV cache as Core ML states (one fp16 k and v state per layer, see export/coreml_llm.py).

The token embedding lives in the LLM package (function ``embed``) rather than in its own package:
Qwen2.5 ties it to lm_head, and ``save_multifunction`` deduplicates identical weights across
functions, so the 151,936 x H table is stored once (a separate package would store it twice).
Compression (quantize/coreml.py) is applied to each converted function before the merge, so the
stored weights are exactly what the recipe says; the manifest records what was applied.
"""
from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

from sfedge.export.api import EXPORTERS, PART_BY_PART, ExportOptions
from sfedge.export.common import Progress, artifact_entry, model_part, projector_frame_counts, projector_stem
from sfedge.export.coreml_convert import Port, convert, export_program, load_spec, save_multifunction
from sfedge.export.coreml_llm import DecoderStep, EmbedStep, use_masked_cache
from sfedge.manifest import ArtifactEntry, Component, TensorSpec
from sfedge.models import SFLlava, release_part
from sfedge.quantize.coreml import STATEFUL_TARGET, check_target, compress, quantized_before_conversion, target_rank
from sfedge.quantize.coreml_torch import llm_quantized_in_torch, quantize_linears, quantize_llm, quantizes_in_torch
from sfedge.quantize.recipes import Recipe

VISION_FILE, LLM_FILE = "vision_encoder.mlpackage", "llm.mlpackage"
FN_EMBED, FN_PREFILL, FN_DECODE = "embed", "prefill", "decode"


def component_targets(options: ExportOptions) -> dict:
    """Deployment target per component: stateless packages take --coreml-target, the LLM needs iOS18."""
    target_rank(options.coreml_target)  # unknown names fail here, with the known ones listed
    return {Component.VISION_ENCODER.value: options.coreml_target, Component.PROJECTOR.value: options.coreml_target,
            Component.TOKEN_EMBEDDING.value: STATEFUL_TARGET, Component.TEXT_DECODER.value: STATEFUL_TARGET}


def _convert_one(module, inputs: List[Port], outputs: List[Port], target: str, scheme, op_types: tuple, path: Path,
                 progress: Progress, label: str, prequantized: Optional[List[str]] = None) -> dict:
    """``op_types``: the ops whose weights are compressed after conversion. ``prequantized``: the module's linear
    weights were quantized in torch (quantize/coreml_torch.py; the list names the per-channel fallbacks), so
    conversion already writes them compressed."""
    with progress.stage(label, "trace"):
        program = export_program(module, inputs)
    with progress.stage(label, "lower"):
        mlmodel = convert(program, inputs, outputs, target)
        del program
    applied = {}
    if op_types:
        with progress.stage(label, "quantize"):
            mlmodel, applied = compress(mlmodel, scheme, op_types)
    if prequantized is not None:
        after = f"; {', '.join(op_types)} after conversion" if op_types else ""
        applied = quantized_before_conversion(mlmodel, scheme, prequantized + applied.get("per_channel_fallback", []), after)
    with progress.stage(label, "serialize"):
        mlmodel.save(str(path))
    return applied


def _static_entry(out: Path, component: str, file: str, inputs, outputs, applied: dict, target: str) -> ArtifactEntry:
    return artifact_entry(out, component, file, [p.spec() for p in inputs], [p.spec() for p in outputs], applied,
                          deployment_target=target, compute_precision="float16")


def export_vision(model: SFLlava, options: ExportOptions, recipe: Recipe, out: Path, progress: Progress, target: str):
    vision = model.config.vision
    component = Component.VISION_ENCODER.value
    inputs = [Port("pixels", (options.encoder_batch, 3, vision.frame_size, vision.frame_size), "float16")]
    outputs = [Port("features", (options.encoder_batch, vision.patches_per_frame, vision.width), "float16")]
    scheme = recipe.scheme(component)
    prequantized, op_types = None, ("linear", "conv")
    if quantizes_in_torch(scheme):  # the linears (96% of the weights) in torch, the patch-embedding conv after conversion
        with progress.stage(component, "quantize"):
            prequantized, op_types = quantize_linears(model.vision_encoder, scheme), ("conv",)
    applied = _convert_one(model.vision_encoder, inputs, outputs, target, scheme, op_types, out / VISION_FILE, progress,
                           component, prequantized)
    return _static_entry(out, component, VISION_FILE, inputs, outputs, applied, target)


def export_projectors(model: SFLlava, options: ExportOptions, recipe: Recipe, out: Path, progress: Progress,
                      target: str) -> List[ArtifactEntry]:
    """One static-shape package per frame count: projector.mlpackage, then projector_f{N}.mlpackage."""
    config = model.config
    component = Component.PROJECTOR.value
    entries = []
    for frames in projector_frame_counts(config.slowfast.frames, options.extra_frames):
        file = f"{projector_stem(frames, config.slowfast.frames)}.mlpackage"
        inputs = [Port("features", (frames, config.vision.patches_per_frame, config.vision.width), "float16")]
        outputs = [Port("visual_embeds", (model.projector.visual_tokens(frames), config.llm.hidden), "float16")]
        applied = _convert_one(model.projector, inputs, outputs, target, recipe.scheme(component), ("linear",),
                               out / file, progress, f"{component}[{frames} frames]")
        entry = _static_entry(out, component, file, inputs, outputs, applied, target)
        entry.extra["frames"] = frames
        entries.append(entry)
    return entries


def llm_ports(hidden: int, vocab: int, chunk: int) -> dict:
    """function -> (inputs, outputs); the runtime reads the same names back from the manifest."""
    step_out = [Port("logits", (1, vocab), "float16")]

    def step(tokens: int):
        return [Port("inputs_embeds", (1, tokens, hidden), "float16"), Port("input_pos", (1,), "int32"),
                Port("last_index", (1,), "int32")], step_out

    return {FN_EMBED: ([Port("token_ids", (1, chunk), "int32")], [Port("embeds", (1, chunk, hidden), "float16")]),
            FN_PREFILL: step(chunk), FN_DECODE: step(1)}


def export_llm(model: SFLlava, options: ExportOptions, recipe: Recipe, out: Path, progress: Progress,
               prequantized: Optional[List[str]] = None, before_merge: Optional[Callable[[], None]] = None) -> List[ArtifactEntry]:
    """``prequantized``: the LLM's weights were quantized in torch (see ``export_coreml``). ``before_merge``: runs
    once the three functions are converted and saved, before ``save_multifunction`` loads them back (e.g. to
    release the torch weights: the merge holds every function's weights at once and sets the export's peak)."""
    llm = model.config.llm
    decoder = model.text_decoder
    use_masked_cache(decoder)
    ports = llm_ports(llm.hidden, llm.vocab_size, options.prefill_chunk)
    modules = {FN_EMBED: EmbedStep(model.token_embedding), FN_PREFILL: DecoderStep(decoder), FN_DECODE: DecoderStep(decoder)}
    schemes = {FN_EMBED: recipe.scheme(Component.TOKEN_EMBEDDING), FN_PREFILL: recipe.scheme(Component.TEXT_DECODER),
               FN_DECODE: recipe.scheme(Component.TEXT_DECODER)}
    op_types = {FN_EMBED: ("gather",), FN_PREFILL: ("linear",), FN_DECODE: ("linear",)}  # not the RoPE gathers
    applied = {}
    parts_dir = Path(tempfile.mkdtemp(prefix="functions-", dir=out))
    try:
        parts = {}
        for function, module in modules.items():
            parts[function] = parts_dir / f"{function}.mlpackage"
            applied[function] = _convert_one(module, *ports[function], STATEFUL_TARGET, schemes[function],
                                             () if prequantized is not None else op_types[function], parts[function],
                                             progress, f"llm.{function}", prequantized)
        del modules
        if before_merge is not None:
            before_merge()
        gc.collect()
        with progress.stage("llm", "serialize"):
            save_multifunction(parts, FN_DECODE, out / LLM_FILE)
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    states = _states(out / LLM_FILE)
    functions = {name: {"inputs": [p.spec() for p in ins], "outputs": [p.spec() for p in outs]}
                 for name, (ins, outs) in ports.items()}
    common = dict(deployment_target=STATEFUL_TARGET, compute_precision="float16", functions=functions)
    embed_in, embed_out = ports[FN_EMBED]
    prefill_in, prefill_out = ports[FN_PREFILL]
    return [
        artifact_entry(out, Component.TOKEN_EMBEDDING.value, LLM_FILE, [p.spec() for p in embed_in],
                       [p.spec() for p in embed_out], applied[FN_EMBED], method=FN_EMBED, **common),
        artifact_entry(out, Component.TEXT_DECODER.value, LLM_FILE, [p.spec() for p in prefill_in],
                       [p.spec() for p in prefill_out], applied[FN_PREFILL], method=FN_PREFILL,
                       states=states, prefill_chunk=options.prefill_chunk, decode_function=FN_DECODE, **common),
    ]


def _states(path: Path) -> List[dict]:
    """The KV-cache states the saved package declares (from its decode function)."""
    spec = load_spec(path)
    for function in spec.description.functions:
        if function.name == FN_DECODE:
            return [{"name": s.name, "shape": list(s.type.stateType.arrayType.shape), "dtype": "float16"}
                    for s in function.state]
    return []


def export_coreml(model: SFLlava, options: ExportOptions, recipe: Recipe, out: Path, progress: Progress) -> List[ArtifactEntry]:
    targets = component_targets(options)
    check_target(recipe, targets)
    entries = []
    with model_part(model, "vision_encoder", progress):  # one part's weights alive at a time
        entries.append(export_vision(model, options, recipe, out, progress, targets[Component.VISION_ENCODER.value]))
    with model_part(model, "projector", progress):
        entries += export_projectors(model, options, recipe, out, progress, targets[Component.PROJECTOR.value])
    # int4 / int8 LLM weights: quantized in torch (each decoder layer as soon as it is filled), so no float32 copy of
    # the LLM is ever converted; the stored weights are those compress() would write (quantize/coreml_torch.py)
    scheme = recipe.scheme(Component.TEXT_DECODER)
    in_torch = llm_quantized_in_torch(recipe)
    fallback: List[str] = []
    on_layer = None
    if in_torch:
        def on_layer(layer):
            fallback.extend(quantize_linears(layer, scheme, f"layers.{list(model.text_decoder.layers).index(layer)}"))
    with model_part(model, "llm", progress, on_layer=on_layer) as filled:
        prequantized = None
        if in_torch:
            with progress.stage("llm", "quantize"):
                prequantized = fallback + quantize_llm(model, scheme, layers_done=filled)
        # a part this export filled is released before the merge (a model built whole is left as it is)
        entries += export_llm(model, options, recipe, out, progress, prequantized,
                              before_merge=(lambda: release_part(model, "llm")) if filled else None)
    return entries


EXPORTERS.add("coreml", export_coreml)
PART_BY_PART.add("coreml")
__all__ = ["export_coreml", "component_targets", "llm_ports", "TensorSpec"]
