"""``--backend executorch-coreml``: one ExecuTorch program whose methods are delegated to Core ML.

``model.pte`` holds the methods ``vision_encoder``, ``projector``, ``token_embedding`` and
``text_decoder`` (ExecuTorch's multimodal names), each lowered with ExecuTorch's
``CoreMLPartitioner`` (coremltools converts the partitions into Core ML models embedded in the
program, fp16 compute, iOS18). The text decoder is the eager model with the same attention swap as
``--backend coreml`` (export/coreml_llm.py: dense masked cache writes, because the eager
``index_copy`` becomes ``index_put``, which coremltools 9.0 fails to convert). Its KV cache stays an
ExecuTorch mutable buffer (``take_over_mutable_buffer=False``, as ExecuTorch's own LLM scripts do;
letting Core ML own the buffers failed inside coremltools' ``optimize_state`` pass): the delegate
takes the cache as an input and returns the new one, which ExecuTorch copies back.

It builds on Linux, but only macOS / iOS ExecuTorch runtimes register ``CoreMLBackend``: the Linux
wheel cannot load the program ("Backend CoreMLBackend is not registered").
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Dict, List

import torch

from sfedge.errors import UsageError
from sfedge.export.api import EXPORTERS, ExportOptions
from sfedge.export.common import Progress, artifact_entry
from sfedge.export.coreml_llm import use_masked_cache
from sfedge.manifest import METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING, METHOD_VISION_ENCODER, ArtifactEntry, Component, TensorSpec
from sfedge.models import SFLlava
from sfedge.quantize.coreml import STATEFUL_TARGET
from sfedge.quantize.recipes import Recipe

PTE_FILE = "model.pte"
METHOD_PROJECTOR = Component.PROJECTOR.value
COREML_BACKEND_ID = "CoreMLBackend"


def _lowering_api():
    try:
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ModuleNotFoundError as exc:
        raise UsageError(f"the executorch-coreml exporter needs {exc.name}: pip install 'sfedge[executorch,coreml]'") from None
    return ct, CoreMLBackend, CoreMLPartitioner, to_edge_transform_and_lower


class _Embed(torch.nn.Module):
    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, token_ids):
        return self.embedding(token_ids)


def _programs(model: SFLlava, options: ExportOptions) -> Dict[str, tuple]:
    """method -> (ExportedProgram, inputs, outputs) with the tensor specs for the manifest."""
    config = model.config
    v, llm = config.vision, config.llm
    frames, chunk = config.slowfast.frames, options.prefill_chunk
    tokens = torch.export.Dim("tokens", min=1, max=chunk)
    pixels = torch.randn(options.encoder_batch, 3, v.frame_size, v.frame_size)
    features = torch.randn(frames, v.patches_per_frame, v.width)
    ids = torch.zeros(1, 2, dtype=torch.long)
    embeds = torch.randn(1, 2, llm.hidden)
    start = torch.tensor([0], dtype=torch.long)
    visual = model.projector.visual_tokens(frames)
    with torch.no_grad():
        return {
            METHOD_VISION_ENCODER: (torch.export.export(model.vision_encoder, (pixels,), strict=False),
                                    [TensorSpec("pixels", list(pixels.shape), "float32")],
                                    [TensorSpec("features", [pixels.shape[0], v.patches_per_frame, v.width], "float32")]),
            METHOD_PROJECTOR: (torch.export.export(model.projector, (features,), strict=False),
                               [TensorSpec("features", list(features.shape), "float32")],
                               [TensorSpec("visual_embeds", [visual, llm.hidden], "float32")]),
            METHOD_TOKEN_EMBEDDING: (torch.export.export(_Embed(model.token_embedding), (ids,), strict=False,
                                                         dynamic_shapes=({1: tokens},)),
                                     [TensorSpec("token_ids", [1, "tokens"], "int64")],
                                     [TensorSpec("embeds", [1, "tokens", llm.hidden], "float32")]),
            METHOD_TEXT_DECODER: (torch.export.export(model.text_decoder, (embeds, start), strict=False,
                                                      dynamic_shapes=({1: tokens}, None)),
                                  [TensorSpec("inputs_embeds", [1, "tokens", llm.hidden], "float32"),
                                   TensorSpec("input_pos", [1], "int64")],
                                  [TensorSpec("logits", [1, llm.vocab_size], "float32")]),
        }


def delegates_by_method(pte_program) -> Dict[str, List[str]]:
    """method -> backend ids of its delegates, read from the emitted program (what the .pte holds)."""
    return {plan.name: [d.id for d in plan.delegates] for plan in pte_program.execution_plan}


def export_executorch_coreml(model: SFLlava, options: ExportOptions, recipe: Recipe, out: Path,
                             progress: Progress) -> List[ArtifactEntry]:
    for component in Component:
        if recipe.scheme(component).scheme != "fp16":
            raise UsageError(f"executorch-coreml recipe {recipe.name!r} asks for {recipe.scheme(component).scheme} on "
                             f"{component.value}; this backend supports fp16 only (use --backend coreml for compression)")
    if options.extra_frames:
        raise UsageError("executorch-coreml writes one .pte with a single projector method: pass one --frames count "
                         "(several counts are supported by --backend executorch, onnx and coreml)")
    ct, CoreMLBackend, CoreMLPartitioner, to_edge_transform_and_lower = _lowering_api()
    use_masked_cache(model.text_decoder, explicit_softmax=True)  # dense cache writes: the whole decoder converts as one Core ML partition
    with progress.stage("model", "trace"):
        programs = _programs(model, options)
    specs = CoreMLBackend.generate_compile_specs(minimum_deployment_target=getattr(ct.target, STATEFUL_TARGET),
                                                 compute_precision=ct.precision.FLOAT16)
    partitioner = CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=False)
    with progress.stage("model", "lower"), _quiet():
        edge = to_edge_transform_and_lower({m: p[0] for m, p in programs.items()}, partitioner=[partitioner])
    with progress.stage("model", "serialize"):
        program = edge.to_executorch()
        (out / PTE_FILE).write_bytes(program.buffer)
    delegates = delegates_by_method(program.executorch_program)
    missing = [m for m in programs if COREML_BACKEND_ID not in delegates.get(m, [])]
    if missing:
        raise UsageError(f"executorch-coreml: CoreMLPartitioner delegated nothing in method(s) {', '.join(missing)}")
    components = {METHOD_VISION_ENCODER: Component.VISION_ENCODER, METHOD_PROJECTOR: Component.PROJECTOR,
                  METHOD_TOKEN_EMBEDDING: Component.TOKEN_EMBEDDING, METHOD_TEXT_DECODER: Component.TEXT_DECODER}
    scheme = {**recipe.scheme(Component.TEXT_DECODER).to_dict(), "applied": "Core ML delegate, compute_precision FLOAT16"}
    return [artifact_entry(out, components[m].value, PTE_FILE, ins, outs, scheme, method=m, delegates=delegates[m],
                           deployment_target=STATEFUL_TARGET, take_over_mutable_buffer=False,
                           **({"prefill_chunk": options.prefill_chunk} if m == METHOD_TEXT_DECODER else {}))
            for m, (_, ins, outs) in programs.items()]


@contextlib.contextmanager
def _quiet():
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


EXPORTERS.add("executorch-coreml", export_executorch_coreml)
