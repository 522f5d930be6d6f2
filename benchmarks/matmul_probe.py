"""Time one LLM-shaped weight matmul in ONNX Runtime under each ONNX weight scheme sfedge's recipes use.

    python -m sfedge.benchmarks.matmul_probe --model sf-llava-1.5-1b --rows 1,128,512 --threads 2

A float32 graph ``y = x @ W`` with W the preset's MLP up-projection ([hidden, intermediate], random) is
written to a temp folder and quantized by ``sfedge.quantize.onnx.quantize_model`` (the export's own code)
into each scheme: fp32 (MatMul), int8 (quantize_dynamic: MatMulInteger), int4 (MatMulNBits, block 32,
accuracy level 4) and int8-channel (DynamicQuantizeMatMul). rows = 1 is a decode step, 128 / 512 a
prefill chunk. Prints ms per call (min of ``--repeats``), GOPS (2 x rows x K x N) and the max relative
error against float32.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from sfedge.errors import SfedgeError, UsageError

SCHEMES = ("fp32", "int8", "int4", "int8-channel")


def _scheme(name: str):
    from sfedge.quantize import onnx as onnx_quant

    return {"fp32": onnx_quant.FP32, "int8": onnx_quant.INT8_MATMUL, "int4": onnx_quant.INT4_MATMUL,
            "int8-channel": onnx_quant.INT8_CHANNEL_MATMUL}[name]


def _fp32_graph(folder: Path, weight) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
                              [numpy_helper.from_array(weight, "w")])
    path = folder / "matmul.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, location="matmul.onnx_data", size_threshold=0)
    return path


def probe(model: str, rows: Sequence[int], threads: int, schemes: Sequence[str], repeats: int = 10) -> list:
    import numpy as np
    import onnxruntime as ort

    from sfedge.config import get_preset
    from sfedge.quantize.onnx import quantize_model

    unknown = [name for name in schemes if name not in SCHEMES]
    if unknown:
        raise UsageError(f"--schemes: {', '.join(unknown)} unknown; use {', '.join(SCHEMES)}")
    llm = get_preset(model).llm
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((llm.hidden, llm.intermediate)) * 0.02).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    results = []
    with tempfile.TemporaryDirectory(prefix="sfedge-matmul-") as work:
        source = _fp32_graph(Path(work), weight)
        for name in schemes:
            proto = quantize_model(source, _scheme(name), Path(work))
            session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
            del proto
            for count in rows:
                x = rng.standard_normal((count, llm.hidden)).astype(np.float32)
                y = session.run(None, {"x": x})[0]
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    session.run(None, {"x": x})
                    times.append(time.perf_counter() - start)
                reference = x @ weight
                seconds = min(times)
                results.append({"scheme": name, "rows": count, "ms": seconds * 1e3,
                                "gops": 2 * count * llm.hidden * llm.intermediate / seconds / 1e9,
                                "max_rel_error": float(np.abs(y - reference).max() / np.abs(reference).max())})
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sfedge.benchmarks.cases import parse_int_list

    parser = argparse.ArgumentParser(prog="python -m sfedge.benchmarks.matmul_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sf-llava-1.5-1b", help="preset whose MLP shape to use")
    parser.add_argument("--rows", default="1,128,512", help="rows of x: 1 = a decode step, 128 / 512 = a prefill chunk")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated: {', '.join(SCHEMES)}")
    parser.add_argument("-r", "--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        if args.threads < 1 or args.repeats < 1:
            raise UsageError("--threads and --repeats must be at least 1")
        rows = probe(args.model, parse_int_list(args.rows, "--rows"), args.threads,
                     [name.strip() for name in args.schemes.split(",") if name.strip()], args.repeats)
    except SfedgeError as exc:
        print(f"matmul_probe: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    print("| scheme | rows | ms per call (min) | GOPS | max rel. error vs fp32 |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['scheme']} | {row['rows']} | {row['ms']:.2f} | {row['gops']:.0f} | {row['max_rel_error']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
