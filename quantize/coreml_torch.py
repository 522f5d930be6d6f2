"""Core ML linear weight quantization (int4 per block, int8 per channel) done on the torch modules BEFORE
conversion, so ``ct.convert`` never sees a float32 copy of the LLM.

The other route (quantize/coreml.py ``compress``) converts the float32 program, lets the fp16 pass cast it,
then runs ``linear_quantize_weights`` on the converted program: the torch weights, the MIL program's and the
compressor's copies of a 5.75 GiB (1B) LLM are alive at once. Here each ``nn.Linear`` / ``nn.Embedding`` weight
is quantized as soon as it exists (one decoder layer at a time while the part is filled) with coremltools' own
``compute_qparams_by_dtype`` on the fp16-cast weight, i.e. exactly what ``linear_quantize_weights`` computes
on the converted fp16 program, and the module keeps only the integer data and scales. Its forward calls
torchao's ``dequantize_affine``, which coremltools 9.0 converts to the same ``constexpr_blockwise_shift_scale``
(``linear`` / ``gather`` reading it), so the stored weights are identical to the compress route's (test).

Scales are kept in float32 holding the fp16 values: an fp16 scale would make the dequantized weight fp16 in an
fp32 graph, and coremltools would then cast it and lower ``linear`` as ``matmul``; with fp32 the fp16 pass
casts the scale back to the same fp16 bytes and the op stays ``linear``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sfedge.quantize.recipes import ComponentScheme

WEIGHT_THRESHOLD = 2048  # as ``compress``: weights of at most this many values stay float (coremltools' rule)
ROWS_PER_SLICE = 8192  # rows quantized at once (per-row blocks: slicing rows gives the same result)
_QUANT_RANGE = {"int4": (-8, 7), "int8": (-128, 127)}  # tells coremltools' converter the stored dtype


def quantizes_in_torch(scheme: ComponentScheme) -> bool:
    """The linear-symmetric schemes (int4 per block, int8 per channel) can be applied before conversion."""
    return scheme.scheme in _QUANT_RANGE and scheme.options.get("mode") == "linear_symmetric"


def llm_quantized_in_torch(recipe) -> bool:
    """Whether ``--backend coreml`` quantizes this recipe's LLM in torch: a linear-symmetric decoder scheme, and the
    same one for the (tied) token embedding so the table is quantized once."""
    from sfedge.manifest import Component

    scheme = recipe.scheme(Component.TEXT_DECODER)
    return quantizes_in_torch(scheme) and recipe.scheme(Component.TOKEN_EMBEDDING) == scheme


def _import_torchao() -> None:
    """Registers torch.ops.torchao.dequantize_affine (and lets coremltools' converter translate it)."""
    from sfedge.errors import UsageError

    try:
        import torchao.quantization.quant_primitives  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UsageError(f"Core ML int4/int8 export needs {exc.name}: pip install 'sfedge[coreml]'") from None


@dataclass(frozen=True)
class Blocks:
    """One weight's quantization grid: ``block`` input channels share a scale (the whole row: per channel)."""

    block: int
    per_channel_fallback: bool  # per-block asked, but the input width is not a multiple of the block


def blocks_for(scheme: ComponentScheme, in_features: int) -> Blocks:
    if scheme.options.get("granularity") == "per_block":
        block = scheme.group_size or 32
        if in_features % block == 0:
            return Blocks(block, False)
        return Blocks(in_features, True)
    return Blocks(in_features, False)


class QuantizedWeight(nn.Module):
    """A [out, in] weight as integer data (int8 storage of int4/int8 values) and one scale per block;
    ``forward()`` returns the dequantized float32 weight through torchao's ``dequantize_affine``."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, block: int, dtype: str):
        super().__init__()
        self.register_buffer("data", data)
        self.register_buffer("scale", scale)
        self.block = block
        self.dtype_name = dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def forward(self) -> torch.Tensor:
        low, high = _QUANT_RANGE[self.dtype_name]
        return torch.ops.torchao.dequantize_affine(self.data, [1, self.block], self.scale, None, torch.int8, low, high,
                                                   torch.float32)


def quantize_weight(weight: torch.Tensor, scheme: ComponentScheme) -> tuple[QuantizedWeight, Blocks]:
    """coremltools' linear-symmetric quantization of ``weight`` [out, in] as ``linear_quantize_weights`` computes
    it on the converted (fp16) program, a slice of rows at a time."""
    from coremltools.converters.mil.mil import types
    from coremltools.optimize import _utils as optimize_utils

    _import_torchao()
    blocks = blocks_for(scheme, weight.shape[1])
    dtype = types.string_to_builtin(scheme.options["dtype"])
    data = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty((weight.shape[0], weight.shape[1] // blocks.block), dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, weight.shape[0], ROWS_PER_SLICE):
            rows = weight[start:start + ROWS_PER_SLICE].to(torch.float16).numpy()
            q, s, offset = optimize_utils.compute_qparams_by_dtype(rows, dtype, "LINEAR_SYMMETRIC", [1, blocks.block])
            assert offset is None  # linear_symmetric has no zero point
            data[start:start + ROWS_PER_SLICE] = torch.from_numpy(np.asarray(q).astype(np.int8))
            scale[start:start + ROWS_PER_SLICE] = torch.from_numpy(np.asarray(s, dtype=np.float16).astype(np.float32))
    return QuantizedWeight(data, scale, blocks.block, scheme.options["dtype"]), blocks


class QuantizedLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight, bias: Optional[nn.Parameter]):
        super().__init__()
        self.weight_q = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_q(), self.bias)


class QuantizedEmbedding(nn.Module):
    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.weight_q = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_q())


def quantize_linears(module: nn.Module, scheme: ComponentScheme, prefix: str = "") -> List[str]:
    """Replace every ``nn.Linear`` under ``module`` whose weight has more than WEIGHT_THRESHOLD values by a
    QuantizedLinear (its float weight is dropped); returns the names that fell back to per channel."""
    fallback = []
    for parent_name, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.numel() > WEIGHT_THRESHOLD:
                weight, blocks = quantize_weight(child.weight, scheme)
                setattr(parent, name, QuantizedLinear(weight, child.bias))
                if blocks.per_channel_fallback:
                    fallback.append(".".join(n for n in (prefix, parent_name, name) if n))
    return fallback


def quantize_tied_table(embedding_owner: nn.Module, head_owner: nn.Module, scheme: ComponentScheme) -> QuantizedWeight:
    """The token table of ``embedding_owner.embed_tokens`` (nn.Embedding), tied to ``head_owner.lm_head``:
    quantized once, both modules read the same QuantizedWeight (one stored copy after the multifunction merge)."""
    weight, _ = quantize_weight(embedding_owner.embed_tokens.weight, scheme)
    embedding_owner.embed_tokens = QuantizedEmbedding(weight)
    head_owner.lm_head = QuantizedLinear(weight, None)
    return weight


def quantize_llm(model: nn.Module, scheme: ComponentScheme, layers_done: bool) -> List[str]:
    """Quantize an SFLlava's LLM part in place (the decoder layers too unless ``layers_done``: already done one at a
    time while they were filled); returns the weights that fell back to per channel."""
    decoder = model.text_decoder
    fallback = []
    if not layers_done:
        for index, layer in enumerate(decoder.layers):
            fallback += quantize_linears(layer, scheme, f"layers.{index}")
    table_blocks = blocks_for(scheme, model.token_embedding.embed_tokens.weight.shape[1])
    if model.config.llm.tie_embeddings:
        quantize_tied_table(model.token_embedding, decoder, scheme)
        fallback += ["embed_tokens", "lm_head"] if table_blocks.per_channel_fallback else []
    else:
        weight, _ = quantize_weight(model.token_embedding.embed_tokens.weight, scheme)
        model.token_embedding.embed_tokens = QuantizedEmbedding(weight)
        fallback += ["embed_tokens"] if table_blocks.per_channel_fallback else []
        fallback += quantize_linears(decoder, scheme)  # what is left: lm_head
    return fallback
