"""Core ML int4/int8 weights quantized in torch before conversion (quantize/coreml_torch.py): the same numbers
coremltools' linear_quantize_weights writes after conversion, the tied table quantized once, and (slow) the
converted program storing exactly the weights of the compress-after-conversion route."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("coremltools")
pytest.importorskip("torchao")

from sfedge.config import get_preset  # noqa: E402
from sfedge.models import WeightsSource, build_model  # noqa: E402
from sfedge.quantize import coreml_torch  # noqa: E402
from sfedge.quantize.coreml import INT4, INT8, PALETTIZE4  # noqa: E402
from sfedge.quantize.coreml_torch import (  # noqa: E402
    WEIGHT_THRESHOLD, QuantizedEmbedding, QuantizedLinear, quantize_llm, quantize_weight, quantizes_in_torch,
)


def _coremltools_reference(weight: torch.Tensor, nbits: int, block_sizes: list):
    """What linear_quantize_weights computes for a const of the converted (fp16) program."""
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights  # the pass (class)

    params = linear_quantize_weights.blockwise_compress(weight.to(torch.float16).numpy(), nbits=nbits,
                                                        mode="LINEAR_SYMMETRIC", signed=True, block_sizes=block_sizes)
    return np.asarray(params.data).astype(np.int8), np.asarray(params.scale)


@pytest.mark.parametrize("scheme, shape, nbits, block_sizes, fallback", [
    (INT4, (96, 64), 4, [1, 32], False),
    (INT4, (40, 48), 4, [1, 0], True),  # 48 input channels: not a multiple of 32 -> per channel, as compress() does
    (INT8, (96, 64), 8, [1, 0], False),
])
def test_quantize_weight_is_coremltools_quantization_slice_by_slice(monkeypatch, scheme, shape, nbits, block_sizes,
                                                                   fallback):
    monkeypatch.setattr(coreml_torch, "ROWS_PER_SLICE", 7)  # several slices, the last one short
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    quantized, blocks = quantize_weight(weight, scheme)
    data, scale = _coremltools_reference(weight, nbits, block_sizes)
    assert blocks.per_channel_fallback == fallback
    assert torch.equal(quantized.data, torch.from_numpy(data))
    assert quantized.scale.dtype == torch.float32  # the fp16 scale's values, kept fp32 so the graph stays fp32
    assert np.array_equal(quantized.scale.numpy().astype(np.float16), scale.reshape(quantized.scale.shape))
    dequantized = quantized()  # torchao's dequantize_affine
    expected = (quantized.data.float().reshape(shape[0], -1, blocks.block) * quantized.scale[:, :, None]).reshape(shape)
    assert torch.equal(dequantized, expected)
    assert (dequantized - weight).abs().max() <= quantized.scale.max() * 0.51 + 1e-3  # within half a step (+fp16)


def test_only_linear_symmetric_schemes_go_through_torch():
    assert quantizes_in_torch(INT4) and quantizes_in_torch(INT8)
    assert not quantizes_in_torch(PALETTIZE4)


def test_quantize_llm_quantizes_the_compress_set_and_ties_the_table_once():
    config = get_preset("tiny")
    model = build_model(config, WeightsSource(seed=0), 64)
    eager = copy.deepcopy(model)
    assert quantize_llm(model, INT4, layers_done=False) == []
    decoder = model.text_decoder
    assert isinstance(model.token_embedding.embed_tokens, QuantizedEmbedding)
    assert decoder.lm_head.weight_q is model.token_embedding.embed_tokens.weight_q  # one quantized table
    quantized = [m for m in decoder.modules() if isinstance(m, QuantizedLinear)]
    plain = [m for m in decoder.modules() if isinstance(m, nn.Linear)]
    # q, o, gate, up, down per layer + lm_head; k/v (2,048 values) sit at coremltools' threshold, as in compress()
    assert len(quantized) == 5 * config.llm.layers + 1
    assert plain and all(m.weight.numel() <= WEIGHT_THRESHOLD for m in plain)
    assert all(m.bias is not None for m in (layer.self_attn.q_proj for layer in decoder.layers))  # biases kept
    ids = torch.tensor([[1, 5, 9, 200]])
    x = torch.randn(1, 4, config.llm.hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        table = decoder.lm_head.weight_q
        assert torch.equal(model.token_embedding(ids), table()[ids])  # the embedding reads the dequantized table
        assert torch.allclose(model.token_embedding(ids), eager.token_embedding(ids), atol=0.6 * table.scale.max().item())
        q_proj = decoder.layers[0].self_attn.q_proj
        eager_q = eager.text_decoder.layers[0].self_attn.q_proj
        assert torch.allclose(q_proj(x), torch.nn.functional.linear(x, q_proj.weight_q(), eager_q.bias))


@pytest.mark.slow
def test_converted_program_stores_what_compress_would():
    """The LLM's prefill and embed functions: converted from the torch-quantized modules vs converted in float then
    compressed with compress(): the same constexpr ops with identical int4 data and fp16 scales, read by the same ops."""
    from sfedge.export.coreml import FN_EMBED, FN_PREFILL, llm_ports
    from sfedge.export.coreml_convert import convert, export_program
    from sfedge.export.coreml_llm import DecoderStep, EmbedStep, use_masked_cache
    from sfedge.quantize.coreml import compress

    config = get_preset("tiny")
    model = build_model(config, WeightsSource(seed=0), 64)
    use_masked_cache(model.text_decoder)
    reference = copy.deepcopy(model)
    quantize_llm(model, INT4, layers_done=False)

    def constexprs(mlmodel):
        return [(op.op_type, [c.op_type for c in op.outputs[0].child_ops], op.data.val, op.scale.val, op.offset)
                for f in mlmodel._mil_program.functions.values() for op in f.operations if op.op_type.startswith("constexpr")]

    steps = {FN_PREFILL: (lambda m: DecoderStep(m.text_decoder), ("linear",)),
             FN_EMBED: (lambda m: EmbedStep(m.token_embedding), ("gather",))}
    for function, (step, op_types) in steps.items():
        inputs, outputs = llm_ports(config.llm.hidden, config.llm.vocab_size, 16)[function]
        compressed, _ = compress(convert(export_program(step(reference), inputs), inputs, outputs, "iOS18"), INT4, op_types)
        converted = convert(export_program(step(model), inputs), inputs, outputs, "iOS18")
        expected, got = constexprs(compressed), constexprs(converted)
        assert len(got) == len(expected) == (5 * config.llm.layers + 1 if function == FN_PREFILL else 1)
        for (op, readers, data, scale, offset), (op2, readers2, data2, scale2, offset2) in zip(expected, got):
            assert (op2, readers2, offset2) == (op, readers, offset) and readers2 == list(op_types)
            assert data2.dtype == data.dtype and np.array_equal(data2, data)
            assert scale2.dtype == scale.dtype == np.float16 and np.array_equal(scale2, scale)


@pytest.mark.slow
def test_vision_encoder_linears_quantized_in_torch_store_what_compress_would():
    """int8 per channel: the vision encoder's linears quantized in torch and its conv compressed after conversion
    give the constexprs compress() gives when it compresses both after conversion."""
    from sfedge.export.coreml_convert import Port, convert, export_program
    from sfedge.quantize.coreml import compress
    from sfedge.quantize.coreml_torch import quantize_linears

    config = get_preset("tiny")
    vision = build_model(config, WeightsSource(seed=0), 64).vision_encoder
    reference = copy.deepcopy(vision)
    assert quantize_linears(vision, INT8) == []
    inputs = [Port("pixels", (1, 3, config.vision.frame_size, config.vision.frame_size), "float16")]
    outputs = [Port("features", (1, config.vision.patches_per_frame, config.vision.width), "float16")]
    expected, _ = compress(convert(export_program(reference, inputs), inputs, outputs, "iOS18"), INT8, ("linear", "conv"))
    got, applied = compress(convert(export_program(vision, inputs), inputs, outputs, "iOS18"), INT8, ("conv",))

    def constexprs(mlmodel):
        return [([c.op_type for c in op.outputs[0].child_ops], op.data.val, op.scale.val)
                for f in mlmodel._mil_program.functions.values() for op in f.operations if op.op_type.startswith("constexpr")]

    pairs = list(zip(constexprs(expected), constexprs(got)))
    assert len(pairs) == len(constexprs(expected)) == len(constexprs(got)) == applied["compressed_weights"]
    assert {"conv", "linear"} <= {reader for (readers, _, _), _ in pairs for reader in readers}
    for (readers, data, scale), (readers2, data2, scale2) in pairs:
        assert readers2 == readers and np.array_equal(data2, data) and np.array_equal(scale2, scale)
