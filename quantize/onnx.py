"""ONNX quantization recipes (data) and the ONNX Runtime tools that apply them to one file.

Schemes, in ONNX Runtime's vocabulary:
  fp32   the graph as exported
  fp16   onnxruntime.transformers.float16 conversion, float32 graph inputs/outputs kept
  int8   onnxruntime.quantization.quantize_dynamic: int8 weights, activations quantized at run time
         (MatMul -> DynamicQuantizeLinear + MatMulInteger; Gather -> int8 table + DequantizeLinear)
  int8-static  onnxruntime.quantization.quantize_static, QDQ format: per-channel int8 weights, uint8
         activations with ranges calibrated on frames (sfedge.quantize.onnx_calibration); vision encoder only
  int4   MatMulNBitsQuantizer: 4-bit block-wise weights (MatMul -> MatMulNBits, Gather -> GatherBlockQuantized)
  int8-channel  per-output-channel symmetric int8 weights, activations quantized at run time, as one
         com.microsoft.DynamicQuantizeMatMul per MatMul (sfedge's own pass, tensor by tensor from the
         memory-mapped external data): ONNX Runtime runs it on its int8 GEMM (MLAS QGEMM: AVX-512 VNNI, AMX),
         ~10x MatMulNBits' int4 kernels on a prefill chunk on x86 (docs/onnx.md)
  q4f16  fp16 conversion, then int4 as above
A recipe may give a component a second scheme for a decode graph (Recipe.decode): the fp32 graph is then
quantized twice, into the component's file (prefill, T > 1) and its decode graph (T = 1); see export/onnx.py.
Which component gets which scheme is recipe data below; file names carry transformers.js's suffixes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List

from sfedge.errors import SfedgeError
from sfedge.manifest import Component
from sfedge.quantize.recipes import (
    FP16_TOLERANCE, FP32_TOLERANCE, INT4_TOLERANCE, INT8_TOLERANCE, ComponentScheme, Recipe, register_recipe, uniform,
)

from sfedge.quantize.recipes import INT4_DECODE_TOLERANCE, Q4F16_TOLERANCE, SIMULATORS  # parity: the q4f16 bound; simulate_recipe below

log = logging.getLogger(__name__)

# transformers.js precision suffixes: decoder_model_merged_q4.onnx etc.
FILE_SUFFIX = {"fp32": "", "fp16": "_fp16", "int8": "_quantized", "int8-static": "_int8", "int4": "_q4",
               "q4f16": "_q4f16", "int8-channel": "_q8"}
# protobuf cannot serialize a message over 2 GiB: weights go to <file>_data above this size
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
DATA_SUFFIX = "_data"  # decoder_model_merged.onnx -> decoder_model_merged.onnx_data, as transformers.js names it

C = Component
FP32 = ComponentScheme("fp32")
FP16 = ComponentScheme("fp16", options={"keep_io_types": True})
INT8_MATMUL = ComponentScheme("int8", options={"ops": ("MatMul",), "weight_type": "int8", "per_channel": False})
INT8_GATHER = ComponentScheme("int8", options={"ops": ("Gather",), "weight_type": "int8", "per_channel": False})
INT8_STATIC = ComponentScheme("int8-static", options={"ops": ("MatMul",), "per_channel": True, "weight_type": "int8",
                                                      "activation_type": "uint8", "calibration_frames": 8})
INT4_MATMUL = ComponentScheme("int4", 32, {"ops": ("MatMul",), "symmetric": True, "accuracy_level": 4})
INT4_GATHER = ComponentScheme("int4", 32, {"ops": ("Gather",), "symmetric": True, "accuracy_level": 4})
INT8_CHANNEL_MATMUL = ComponentScheme("int8-channel", options={"ops": ("MatMul",)})
INT4_DECODE_MATMUL = ComponentScheme("int4", 128, {"ops": ("MatMul",), "symmetric": True, "accuracy_level": 4})
Q4F16_MATMUL = ComponentScheme("q4f16", 32, {"ops": ("MatMul",), "symmetric": True, "accuracy_level": 4,
                                             "keep_io_types": True})

register_recipe(Recipe("fp32", "onnx", "float32 graphs as exported (the parity baseline)", uniform(FP32), FP32_TOLERANCE))
register_recipe(Recipe("fp16", "onnx", "float16 weights and compute, float32 inputs/outputs", uniform(FP16), FP16_TOLERANCE))
register_recipe(Recipe(
    "int8", "onnx", "dynamic int8 (MatMulInteger) everywhere; int8 embedding table",
    uniform(INT8_MATMUL, **{C.TOKEN_EMBEDDING.value: INT8_GATHER}), INT8_TOLERANCE))
register_recipe(Recipe(
    "int4", "onnx",
    "4-bit block-32 weights (MatMulNBits, GatherBlockQuantized) for the memory-bound LLM; dynamic int8 for the "
    "compute-bound vision encoder and the projector",
    {C.VISION_ENCODER.value: INT8_MATMUL, C.PROJECTOR.value: INT8_MATMUL,
     C.TOKEN_EMBEDDING.value: INT4_GATHER, C.TEXT_DECODER.value: INT4_MATMUL}, INT4_TOLERANCE))
register_recipe(Recipe(
    "int8-channel", "onnx",
    "LLM weights int8 per output channel on ONNX Runtime's int8 GEMMs (DynamicQuantizeMatMul: ~10x int4's prefill "
    "matmuls on x86 with VNNI/AMX, decode at int4's rate, 2x its LLM bytes); int4 token table; dynamic int8 vision",
    {C.VISION_ENCODER.value: INT8_MATMUL, C.PROJECTOR.value: INT8_MATMUL,
     C.TOKEN_EMBEDDING.value: INT4_GATHER, C.TEXT_DECODER.value: INT8_CHANNEL_MATMUL}, INT8_TOLERANCE))
register_recipe(Recipe(
    "int8-channel-q4decode", "onnx",
    "int8-channel's decoder for prefill chunks plus a second decoder graph for decode steps with 4-bit block-128 "
    "weights (MatMulNBits, accuracy level 4: ~0.55x the int8 bytes per token), both over one KV cache; int4 token "
    "table; dynamic int8 vision",
    {C.VISION_ENCODER.value: INT8_MATMUL, C.PROJECTOR.value: INT8_MATMUL,
     C.TOKEN_EMBEDDING.value: INT4_GATHER, C.TEXT_DECODER.value: INT8_CHANNEL_MATMUL}, INT4_DECODE_TOLERANCE,
    decode={C.TEXT_DECODER.value: INT4_DECODE_MATMUL}, prefill_tolerance=INT8_TOLERANCE))
register_recipe(Recipe(
    "int4-vision-static", "onnx",
    "int4 with a static int8 (QDQ) vision encoder: per-channel int8 weights, uint8 activations calibrated on frames "
    "(--calibration-video, default synthetic frames)",
    {C.VISION_ENCODER.value: INT8_STATIC, C.PROJECTOR.value: INT8_MATMUL,
     C.TOKEN_EMBEDDING.value: INT4_GATHER, C.TEXT_DECODER.value: INT4_MATMUL}, INT4_TOLERANCE))
register_recipe(Recipe(
    "q4f16", "onnx", "fp16 graphs with 4-bit MatMulNBits weights in the LLM (transformers.js q4f16, for fp16 devices)",
    {C.VISION_ENCODER.value: FP16, C.PROJECTOR.value: FP16, C.TOKEN_EMBEDDING.value: FP16,
     C.TEXT_DECODER.value: Q4F16_MATMUL}, Q4F16_TOLERANCE))


def file_suffix(scheme: ComponentScheme) -> str:
    if scheme.scheme not in FILE_SUFFIX:
        raise SfedgeError(f"ONNX scheme {scheme.scheme!r} is unknown; known: {', '.join(FILE_SUFFIX)}")
    return FILE_SUFFIX[scheme.scheme]


def data_file(path: Path) -> Path:
    return path.with_name(path.name + DATA_SUFFIX)


def weight_bytes(proto) -> int:
    """Bytes of the initializers (in memory or external), without serializing the proto."""
    from onnx.external_data_helper import uses_external_data

    total = 0
    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            total += int({e.key: e.value for e in tensor.external_data}.get("length", 0))
        else:
            total += len(tensor.raw_data) or tensor.ByteSize()
    return total


def save_model(proto, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> List[str]:
    """Write ``proto`` to ``path``; weights go to ``<file>_data`` when they exceed ``threshold`` bytes.
    A stale data file is deleted first (onnx appends to an existing one). Returns the data file names."""
    import onnx

    path = Path(path)
    data = data_file(path)
    data.unlink(missing_ok=True)
    if weight_bytes(proto) < threshold:
        onnx.save_model(proto, str(path))
        return []
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [data.name]


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def _to_fp16(src: Path, scheme: ComponentScheme, work: Path):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    inferred = work / f"{src.stem}.shapes.onnx"
    onnx.shape_inference.infer_shapes_path(str(src), str(inferred))  # path-based: works above 2 GB
    model = convert_float_to_float16(_load(inferred), keep_io_types=bool(scheme.options.get("keep_io_types", True)),
                                     disable_shape_infer=True)
    _gqa_cache_in_fp16(model)
    OnnxModel(model).topological_sort()  # the io Casts are appended last; onnx.checker wants nodes in order
    return model


def _gqa_cache_in_fp16(model) -> None:
    """Drop the float32<->float16 Casts between the graph's KV inputs/outputs and GroupQueryAttention.

    With them, past and present are different tensors, ORT's kernel cannot share the buffer, and every
    step copies the whole cache twice. Without them the KV cache is float16 at the graph's boundary
    (half the bytes); every other input and output stays float32."""
    from onnx import TensorProto

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    drop = []
    for value in graph.input:
        casts = consumers.get(value.name, [])
        if len(casts) != 1 or casts[0].op_type != "Cast":
            continue
        users = consumers.get(casts[0].output[0], [])
        if users and all(user.op_type == "GroupQueryAttention" for user in users):
            for user in users:
                user.input[:] = [value.name if name == casts[0].output[0] else name for name in user.input]
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
            drop.append(casts[0])
    for value in graph.output:
        cast = producer.get(value.name)
        source = producer.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
        if source is not None and source.op_type == "GroupQueryAttention" and len(consumers.get(cast.input[0], [])) == 1:
            source.output[:] = [value.name if name == cast.input[0] else name for name in source.output]
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
            drop.append(cast)
    for node in drop:
        graph.node.remove(node)


def _to_int8(src: Path, scheme: ComponentScheme, work: Path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    out = work / f"{src.stem}.int8.onnx"
    quantize_dynamic(str(src), str(out), op_types_to_quantize=list(scheme.options.get("ops", ("MatMul",))),
                     per_channel=bool(scheme.options.get("per_channel", False)),
                     weight_type=weight_types[str(scheme.options.get("weight_type", "int8"))],
                     use_external_data_format=True)
    return _load(out)


def _to_int8_static(src: Path, scheme: ComponentScheme, work: Path, calibration):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from sfedge.quantize.onnx_calibration import FramesReader

    if calibration is None:
        raise SfedgeError(f"scheme int8-static of {src.name} needs calibration inputs (a vision encoder's frames)")
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    graph = _load_structure(src)
    ops = set(scheme.options.get("ops", ("MatMul",)))
    weights = {tensor.name for tensor in graph.initializer}
    # only the weight matmuls: attention's activation x activation products stay float (accuracy)
    nodes = [node.name for node in graph.node if node.op_type in ops and any(i in weights for i in node.input)]
    out = work / f"{src.stem}.int8s.onnx"
    quantize_static(str(src), str(out), FramesReader(graph.input[0].name, calibration), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=sorted(ops), nodes_to_quantize=nodes,
                    per_channel=bool(scheme.options.get("per_channel", True)),
                    activation_type=types[str(scheme.options.get("activation_type", "uint8"))],
                    weight_type=types[str(scheme.options.get("weight_type", "int8"))],
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                    extra_options={"CalibStridedMinMax": 1})  # ranges reduced after every frame: bounded memory
    return _load(out)


def _load_structure_only(path: Path):
    """The model with its external initializers left on disk (read per tensor by _to_int4)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _load_structure(path: Path):
    """The graph without its weights' bytes (names and nodes only)."""
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def needs_calibration(scheme: ComponentScheme) -> bool:
    return scheme.scheme == "int8-static"


def _to_int4(model, scheme: ComponentScheme, data_dir: Path | None = None):
    """MatMulNBitsQuantizer over ``model``. ``data_dir``: the model was loaded without its external data, which
    lives there; each node's weight is then read only while that node is quantized (see _read_weights_per_node),
    so at most one float32 weight is in memory (the quantizer's own loop, unchanged)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=int(scheme.group_size or 32),
                                     is_symmetric=bool(scheme.options.get("symmetric", True)),
                                     accuracy_level=scheme.options.get("accuracy_level"),
                                     op_types_to_quantize=tuple(scheme.options.get("ops", ("MatMul",))))
    if data_dir is not None:
        _read_weights_per_node(quantizer, model.graph, Path(data_dir))
    quantizer.process()
    result = quantizer.model.model
    if data_dir is not None:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(result, str(data_dir))  # what is left: norms, biases, RoPE tables
    return result


# The quantizer reads a MatMul weight with onnx_ir (``ir.from_proto(tensor).numpy()``), which memory-maps an
# external tensor's file instead of copying it: those nodes' weights are pointed at their data file by absolute
# path for the node's step, so their float32 bytes never enter the model proto. Loading them into the proto
# instead (as Gather's ``numpy_helper.to_array`` needs) would keep them resident until the whole model is freed:
# protobuf (upb) allocates a message's fields in its root message's arena, and deleting an initializer from the
# graph returns nothing (1B decoder: 5.3 GiB of float32 weights still resident after quantizing, peak 8.5 GiB).
MEMORY_MAPPED_OPS = frozenset({"MatMul"})


def _read_weights_per_node(quantizer, graph, data_dir: Path) -> None:
    """Wrap the quantizer's per-node step: make the node's external initializers readable first (memory-mapped
    for MEMORY_MAPPED_OPS, else loaded into the proto), and after the step restore or drop them."""
    from collections import Counter

    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    uses = Counter(name for node in graph.node for name in node.input)
    quantize_node = quantizer.node_quantizer.quantize

    def quantize(node, graph_stack):
        loaded, mapped = [], []
        for name in node.input:
            for owner in reversed(graph_stack):
                tensor = next((t for t in owner.initializer if t.name == name), None)
                if tensor is not None:
                    if uses_external_data(tensor):
                        if node.op_type in MEMORY_MAPPED_OPS:
                            entry = next(e for e in tensor.external_data if e.key == "location")
                            mapped.append((entry, entry.value))
                            entry.value = str(data_dir.resolve() / entry.value)
                        else:
                            load_external_data_for_tensor(tensor, str(data_dir))
                            tensor.data_location = TensorProto.DEFAULT
                            del tensor.external_data[:]
                            loaded.append((name, owner))
                    break
        try:
            new_nodes = quantize_node(node, graph_stack)
        finally:
            for entry, location in mapped:
                entry.value = location  # relative again: clean_initializers drops it or the final load reads it
        still_used = {name for new in new_nodes for name in new.input}
        for name, owner in loaded:
            uses[name] -= 1
            if uses[name] == 0 and name not in still_used:
                index = next(i for i, t in enumerate(owner.initializer) if t.name == name)
                del owner.initializer[index]
        return new_nodes

    quantizer.node_quantizer.quantize = quantize


def quantize_model(src: Path, scheme: ComponentScheme, work: Path, calibration=None):
    """Apply one component scheme to the fp32 graph at ``src``; returns the new ModelProto.
    ``work`` is a scratch folder for the tools that only take paths; ``calibration`` holds the
    graph's first input for static schemes (float32 [N, ...], one batch of 1 per row)."""
    src, work = Path(src), Path(work)
    file_suffix(scheme)  # unknown scheme names fail here, before any work
    if scheme.scheme == "fp32":
        return _load(src)
    if scheme.scheme == "fp16":
        return _to_fp16(src, scheme, work)
    if scheme.scheme == "int8":
        return _to_int8(src, scheme, work)
    if scheme.scheme == "int8-static":
        return _to_int8_static(src, scheme, work, calibration)
    if scheme.scheme == "int4":
        return _to_int4(_load_structure_only(src), scheme, src.parent)
    if scheme.scheme == "int8-channel":
        from sfedge.quantize.onnx_int8_channel import to_int8_channel

        return to_int8_channel(src, scheme)
    return _to_int4(_to_fp16(src, scheme, work), scheme)  # q4f16


def simulate_recipe(model, recipe: Recipe) -> None:
    """Parity's simulated reference: round the eager model as this recipe's tools do (quantize/onnx_simulate.py)."""
    from sfedge.quantize.onnx_simulate import simulate_recipe as simulate

    simulate(model, recipe)


SIMULATORS["onnx"] = simulate_recipe
