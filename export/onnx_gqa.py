"""ONNX Runtime's ``com.microsoft.GroupQueryAttention`` as a torch custom op, for the in-place KV layout.

``sfedge_onnx::group_query_attention`` has a plain PyTorch implementation (the reference the tests
check the exported graph against) and a translation to one ``GroupQueryAttention`` node per layer,
which ``torch.onnx.export(custom_translation_table=TRANSLATIONS)`` emits. Semantics follow ORT's
contrib op (onnxruntime/core/graph/contrib_ops/bert_defs.cc, contrib_ops/cpu/bert/gqa_attention_base.h):

    query [1, T, H*D], key / value [1, T, Hkv*D] (RoPE already applied by the eager layers)
    past_key / past_value [1, Hkv, L, D]: one buffer per layer of L = max_context positions
    seqlens_k = sum(attention_mask) - 1, total_sequence_length = attention_mask.shape[1] (computed in
    the graph from ``attention_mask [1, start + T]``, so the graph's inputs match the past/present layout)
    -> output [1, T, H*D], present_key / present_value [1, Hkv, L, D]

The T new keys/values land at positions ``total - T .. total - 1``; query i attends to positions
``0 .. total - T + i``. When the caller binds the same buffer as past and present, ORT's CPU kernel
writes only those T rows (it compares the data pointers), so a decode step does not copy the cache.
A start position below the cached length simply overwrites (rewind): rows past ``total`` are ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OP_NAME = "sfedge_onnx::group_query_attention"


@torch.library.custom_op(OP_NAME, mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, attention_mask: torch.Tensor, num_heads: int,
                          kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference implementation (batch 1, no padding), the semantics of ORT's kernel."""
    batch, tokens, _ = query.shape
    head_dim = past_key.shape[-1]
    total = attention_mask.shape[1]
    start = total - tokens
    new_key = key.view(batch, tokens, kv_num_heads, head_dim).transpose(1, 2).to(past_key.dtype)
    new_value = value.view(batch, tokens, kv_num_heads, head_dim).transpose(1, 2).to(past_value.dtype)
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, start:total] = new_key
    present_value[:, :, start:total] = new_value
    groups = num_heads // kv_num_heads
    keys = present_key[:, :, :total].to(query.dtype).repeat_interleave(groups, dim=1)
    values = present_value[:, :, :total].to(query.dtype).repeat_interleave(groups, dim=1)
    q = query.view(batch, tokens, num_heads, head_dim).transpose(1, 2)
    visible = torch.arange(total)[None, :] <= (start + torch.arange(tokens))[:, None]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[None, None])
    return out.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, attention_mask, num_heads, kv_num_heads):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


GQA_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length")
GQA_OUTPUTS = ("output", "present_key", "present_value")


def _gqa_schema():
    """The part of ORT's contrib schema we emit (onnx's registry has no com.microsoft ops; onnxscript
    needs a schema to record a node). Input/output names and order are ORT's."""
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional
    types = {"seqlens_k": "M", "total_sequence_length": "M"}
    inputs = [OpSchema.FormalParameter(name, types.get(name, "T"),
                                       param_option=optional if name in ("key", "value", "past_key", "past_value") else
                                       OpSchema.FormalParameterOption.Single) for name in GQA_INPUTS]
    outputs = [OpSchema.FormalParameter(name, "T") for name in GQA_OUTPUTS]
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
                    attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                                OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "")])


def _translation():
    """The onnxscript function torch.onnx uses for the op (onnxscript is imported only when exporting)."""
    import onnxscript
    from onnxscript import opset18 as op

    msft = onnxscript.values.Opset("com.microsoft", 1)
    gqa_op = onnxscript.values.Op(msft, "GroupQueryAttention", _gqa_schema())
    int32 = 6  # onnx.TensorProto.INT32

    def gqa(query, key, value, past_key, past_value, attention_mask, num_heads: int, kv_num_heads: int):
        kept = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)  # [1]
        seqlens_k = op.Cast(op.Sub(kept, op.Constant(value_int=1)), to=int32)
        total = op.Cast(op.Squeeze(op.Shape(attention_mask, start=1, end=2)), to=int32)
        return gqa_op(query, key, value, past_key, past_value, seqlens_k, total,
                      num_heads=num_heads, kv_num_heads=kv_num_heads)

    return gqa


def translation_table() -> dict:
    return {torch.ops.sfedge_onnx.group_query_attention.default: _translation()}
