"""Attention over a position-major in-place KV cache, as a torch custom op with a standard-ONNX translation.

The ``prefix-inplace`` KV layout (docs/onnx.md). Per layer and kind the runtime keeps one buffer
[1, max_context, kv_heads, head_dim] and binds its first ``start + T`` rows (a contiguous view, no copy) as
both the past input and the present output; ``ScatterND`` writes the T new rows at ``start .. start+T-1``
into that same memory (ORT's kernel skips its input->output copy when the two are one buffer), and the
attention reads the view directly.

Why not ``com.microsoft.GroupQueryAttention`` (the ``gqa-inplace`` layout): ORT 1.32's CPU kernel runs
one [1 x D] x [D x N] product, a softmax and a [1 x N] x [N x D] product per *query* head, in SSE loops
(perf: two 128-bit mulps/addps loops take the step's time), so every KV head is read ``heads / kv_heads``
times per step at a few GB/s. Here a decode step (T = 1) is two GEMMs over the whole view, reading each
cached row once:

    scores^T [N, H]   = K [N, kv_heads * D] @ Qb^T      Qb [H, kv_heads * D]: query head h of group g
                                                         in columns g*D .. g*D+D, zeros elsewhere
    out      [H, kv_heads * D] = softmax_N(scores) @ V [N, kv_heads * D], then the diagonal blocks

(twice the multiply-adds of the exact product, but K and V are streamed once, without a transpose or a
slice copy). A prefill chunk (T > 1) takes the usual path: the view transposed to [1, kv_heads, N, D],
the query heads of a group stacked into one [G*T, D] matrix, the causal mask of the graph added. Both
paths are in the graph; the one that does not apply runs on empty tensors (row counts from ``T == 1``),
so one graph serves prefill and decode without an ``If``.

    query [1, T, H*D], key / value [1, T, Hkv*D] (RoPE applied by the eager layers), past_key /
    past_value [1, start + T, Hkv, D], mask [T, start + T] (bool, True = visible)
    -> output [1, T, H*D], present_key / present_value [1, start + T, Hkv, D]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OP_NAME = "sfedge_onnx::prefix_attention"


@torch.library.custom_op(OP_NAME, mutates_args=())
def prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                     past_value: torch.Tensor, mask: torch.Tensor, num_heads: int, kv_num_heads: int,
                     head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference implementation (batch 1): the last T rows of the past are replaced by the new keys/values."""
    batch, tokens, _ = query.shape
    total = past_key.shape[1]
    start = total - tokens
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, start:] = key.view(batch, tokens, kv_num_heads, head_dim).to(past_key.dtype)
    present_value[:, start:] = value.view(batch, tokens, kv_num_heads, head_dim).to(past_value.dtype)
    groups = num_heads // kv_num_heads
    keys = present_key.transpose(1, 2).to(query.dtype).repeat_interleave(groups, dim=1)
    values = present_value.transpose(1, 2).to(query.dtype).repeat_interleave(groups, dim=1)
    q = query.view(batch, tokens, num_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[None, None])
    return out.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim), present_key, present_value


@prefix_attention.register_fake
def _(query, key, value, past_key, past_value, mask, num_heads, kv_num_heads, head_dim):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _translation():
    """The onnxscript function torch.onnx uses for the op (standard opset-18 ops only)."""
    from onnxscript import opset18 as op

    def reshape(data, shape):  # allowzero: a 0 in a computed shape is an empty dimension, not 'copy the input's'
        return op.Reshape(data, shape, allowzero=1)

    int64 = 7  # onnx.TensorProto.INT64

    def ints(*values):
        return op.Constant(value_ints=list(values))

    def prefix(query, key, value, past_key, past_value, mask, num_heads: int, kv_num_heads: int, head_dim: int):
        # Every size below comes from ``mask`` [T, start + T], the one tensor all layers share, plus attributes:
        # the layers' shape arithmetic is then identical, and ORT's common-subexpression pass keeps one copy.
        groups = num_heads // kv_num_heads
        width, hidden, scale = kv_num_heads * head_dim, num_heads * head_dim, 1.0 / math.sqrt(head_dim)
        tokens = op.Shape(mask, start=0, end=1)  # [1] = T
        total = op.Shape(mask, start=1, end=2)  # [1] = start + T

        # the T new rows, written into the bound buffer at start .. total - 1
        positions = op.Range(op.Squeeze(op.Sub(total, tokens)), op.Squeeze(total), op.Constant(value_int=1))
        indices = op.Unsqueeze(op.Concat(op.Unsqueeze(op.Mul(positions, op.Constant(value_int=0)), ints(1)),
                                         op.Unsqueeze(positions, ints(1)), axis=1), ints(0))  # [1, T, 2]: (0, pos)
        kv_new = op.Concat(ints(1), tokens, ints(kv_num_heads, head_dim), axis=0)
        present_key = op.ScatterND(past_key, indices, reshape(key, kv_new))
        present_value = op.ScatterND(past_value, indices, reshape(value, kv_new))

        decode = op.Cast(op.Equal(tokens, ints(1)), to=int64)  # [1]: 1 for a decode step, else 0
        prefill_rows = op.Sub(tokens, decode)

        # decode (0 or 1 query rows): two GEMMs over the flat view [N, kv_heads * D]
        identity = [float(i == j) for i in range(kv_num_heads) for j in range(kv_num_heads)]
        eye = reshape(op.Constant(value_floats=identity), ints(1, kv_num_heads, 1, kv_num_heads, 1))
        eye_scaled = reshape(op.Constant(value_floats=[value * scale for value in identity]), ints(1, kv_num_heads, 1, kv_num_heads, 1))
        q_dec = op.Slice(query, ints(0), decode, ints(1))
        q5 = reshape(q_dec, op.Concat(decode, ints(kv_num_heads, groups, 1, head_dim), axis=0))
        q_block = reshape(op.Mul(q5, eye_scaled), op.Concat(op.Mul(decode, ints(num_heads)), ints(width), axis=0))
        flat = op.Concat(total, ints(width), axis=0)
        keys_flat, values_flat = reshape(present_key, flat), reshape(present_value, flat)
        scores_t = op.MatMul(keys_flat, op.Transpose(q_block, perm=[1, 0]))  # [N, H*R]
        probs = op.Transpose(op.Softmax(scores_t, axis=0), perm=[1, 0])  # [H*R, N]
        out_block = reshape(op.MatMul(probs, values_flat),
                               op.Concat(decode, ints(kv_num_heads, groups, kv_num_heads, head_dim), axis=0))
        out_dec = reshape(op.ReduceSum(op.Mul(out_block, op.Squeeze(eye, ints(0))), ints(3), keepdims=0),
                             op.Concat(ints(1), decode, ints(hidden), axis=0))  # [1, R, H*D]

        # prefill (T > 1 rows): per kv head, the group's query heads stacked, over the transposed view
        seen = op.Mul(total, op.Sub(ints(1), decode))  # N, or 0 for a decode step
        q_pf = op.Slice(query, decode, tokens, ints(1))
        stacked = op.Concat(ints(1, kv_num_heads), op.Mul(prefill_rows, ints(groups)), ints(head_dim), axis=0)
        q_heads = op.Transpose(reshape(q_pf, op.Concat(ints(1), prefill_rows, ints(kv_num_heads, groups, head_dim), axis=0)),
                               perm=[0, 2, 3, 1, 4])  # [1, Hkv, G, T', D]
        q_heads = op.Mul(reshape(q_heads, stacked), op.Constant(value_float=scale))
        keys_t = op.Transpose(op.Slice(present_key, ints(0), seen, ints(1)), perm=[0, 2, 3, 1])  # [1, Hkv, D, N']
        values_h = op.Transpose(op.Slice(present_value, ints(0), seen, ints(1)), perm=[0, 2, 1, 3])  # [1, Hkv, N', D]
        grouped = op.Concat(ints(1, kv_num_heads, groups), prefill_rows, seen, axis=0)
        scores = reshape(op.MatMul(q_heads, keys_t), grouped)  # [1, Hkv, G, T', N']
        visible = op.Slice(mask, op.Concat(decode, ints(0), axis=0), op.Concat(tokens, seen, axis=0), ints(0, 1))
        bias = op.Where(visible, op.Constant(value_float=0.0), op.Constant(value_float=-math.inf))
        probs_pf = reshape(op.Softmax(op.Add(scores, bias), axis=-1),
                              op.Concat(ints(1, kv_num_heads), op.Mul(prefill_rows, ints(groups)), seen, axis=0))
        out_pf = op.Transpose(reshape(op.MatMul(probs_pf, values_h),
                                         op.Concat(ints(1, kv_num_heads, groups), prefill_rows, ints(head_dim), axis=0)),
                              perm=[0, 3, 1, 2, 4])  # [1, T', Hkv, G, D]
        out_pf = reshape(out_pf, op.Concat(ints(1), prefill_rows, ints(hidden), axis=0))
        return op.Concat(out_dec, out_pf, axis=1), present_key, present_value

    return prefix


def translation_table() -> dict:
    return {torch.ops.sfedge_onnx.prefix_attention.default: _translation()}
