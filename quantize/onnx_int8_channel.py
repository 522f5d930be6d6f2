"""ONNX scheme ``int8-channel``: every weight MatMul -> ``com.microsoft.DynamicQuantizeMatMul`` with int8 weights per
output channel, applied tensor by tensor from the memory-mapped external data (quantize/onnx.py dispatches here).
Why: ONNX Runtime's int8 GEMM (MLAS QGEMM, VNNI/AMX) runs a prefill chunk ~10x faster than MatMulNBits' int4
kernels on x86 (docs/onnx.md)."""
from __future__ import annotations

from pathlib import Path

from sfedge.errors import SfedgeError
from sfedge.quantize.recipes import ComponentScheme


def _external_array(tensor, data_dir: Path):
    """A float32 initializer's values: memory-mapped from its external data file (read-only), or from the proto."""
    import numpy as np
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    return np.memmap(data_dir / info["location"], dtype=np.float32, mode="r", offset=int(info.get("offset", 0)),
                     shape=tuple(tensor.dims))


def int8_channel_weights(weight, rows_per_step: int = 1024):
    """[K, N] float32 -> (int8 [K, N], float32 scale [N]): symmetric per output column, scale = max |w| / 127
    (1 for an all-zero column), rounded half to even; ``rows_per_step`` rows at a time (bounded temporaries)."""
    import numpy as np

    scale = np.zeros(weight.shape[1], dtype=np.float32)
    for row in range(0, weight.shape[0], rows_per_step):
        np.maximum(scale, np.abs(weight[row:row + rows_per_step]).max(axis=0), out=scale)
    scale = np.where(scale > 0, scale / 127.0, 1.0).astype(np.float32)
    quantized = np.empty(weight.shape, dtype=np.int8)
    for row in range(0, weight.shape[0], rows_per_step):
        quantized[row:row + rows_per_step] = np.clip(np.rint(weight[row:row + rows_per_step] / scale), -127, 127)
    return quantized, scale


def to_int8_channel(src: Path, scheme: ComponentScheme):
    """Every MatMul whose second input is a 2-D float32 initializer used once -> com.microsoft.DynamicQuantizeMatMul
    (A float32, B int8 [K, N], b_scale [N]; A is quantized to uint8 per tensor at run time). The model is loaded
    without its external data; each weight is memory-mapped while it is quantized, so no float32 copy of the
    weights is ever resident (1B decoder: 6 GB of float32 in, 1.5 GB of int8 out)."""
    from collections import Counter

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import load_external_data_for_model

    ops = set(scheme.options.get("ops", ("MatMul",)))
    unsupported = ops - {"MatMul"}
    if unsupported:
        raise SfedgeError(f"scheme int8-channel quantizes MatMul only, not {', '.join(sorted(unsupported))}")
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    nodes, replaced = [], set()
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT or uses[weight.name] != 1:
            nodes.append(node)
            continue
        values = _external_array(weight, src.parent)
        quantized, scale = int8_channel_weights(values)
        del values
        graph.initializer.extend([numpy_helper.from_array(quantized, f"{weight.name}_q8"),
                                  numpy_helper.from_array(scale, f"{weight.name}_q8_scale")])
        nodes.append(helper.make_node("DynamicQuantizeMatMul", [node.input[0], f"{weight.name}_q8", f"{weight.name}_q8_scale"],
                                      list(node.output), name=f"{node.name}_q8", domain="com.microsoft"))
        replaced.add(weight.name)
    kept = [tensor for tensor in graph.initializer if tensor.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    load_external_data_for_model(model, str(src.parent))  # what is left: norms, biases, RoPE tables
    return model
