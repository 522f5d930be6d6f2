"""A GGUF file of an sfedge LLM shape, for llama.cpp: architecture ``qwen2``, F32 tensors holding the
*same* seeded random weights sfedge builds for that shape and seed (``sfedge.models.build_model``),
and a minimal gpt2-style tokenizer section (benchmarks feed token ids, never text).

Tensor names come from the ``gguf`` package's own Qwen2 name map (Hugging Face names -> GGUF names),
so the file is what ``convert_hf_to_gguf.py`` would write for a Qwen2 checkpoint of these weights.
Tied embeddings (Qwen2.5 1.5B/3B) write no ``output.weight``: llama.cpp then uses ``token_embd``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from sfedge.config import LLMConfig
from sfedge.errors import SfedgeError

ARCH = "qwen2"
WRITER_VERSION = 1  # bump when the file's content changes (the peers' GGUF cache keys on it)
MERGES = ["Ġ Ġ"]  # llama.cpp's BPE vocabulary needs a merges array; one well-formed pair is enough


def _gguf():
    try:
        import gguf
    except ModuleNotFoundError:
        raise SfedgeError("writing a GGUF file needs the gguf package: pip install 'sfedge[llamacpp]'") from None
    return gguf


def _byte_tokens() -> List[str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocabulary(llm: LLMConfig) -> Tuple[List[str], List[int]]:
    """Token strings and types for ``llm.vocab_size`` ids: the special tokens at their ids (CONTROL),
    the 256 byte tokens on the next free ids, then unique placeholders (NORMAL)."""
    gguf = _gguf()
    special = {token_id: text for text, token_id in llm.special_tokens}
    tokens, types = [], []
    bytes_left = iter(_byte_tokens())
    for token_id in range(llm.vocab_size):
        if token_id in special:
            tokens.append(special[token_id])
            types.append(int(gguf.TokenType.CONTROL))
            continue
        tokens.append(next(bytes_left, None) or f"<|sfedge_{token_id}|>")
        types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def llm_state(llm: LLMConfig, seed: int) -> Dict[str, "object"]:
    """sfedge's seeded random LLM weights, by Hugging Face name (``model.*`` and ``lm_head.weight``):
    the same tensors ``build_model(config, WeightsSource(seed=seed))`` puts in the token embedding and
    text decoder (same generators, same order)."""
    import torch

    from sfedge.models import _generator
    from sfedge.models.llm import TextDecoder, TokenEmbedding
    from sfedge.models.weights import RANDOM_LOGIT_STD, random_state

    with torch.device("meta"):
        embedding, decoder = TokenEmbedding(llm), TextDecoder(llm, max_seq_len=1)
    state = {f"model.{name}": tensor for name, tensor in random_state(
        embedding, _generator(seed, "token_embedding"), torch.float32, RANDOM_LOGIT_STD / llm.hidden ** 0.5).items()}
    for name, tensor in random_state(decoder, _generator(seed, "text_decoder"), torch.float32).items():
        if name == "lm_head.weight":
            if not llm.tie_embeddings:
                state[name] = tensor
        else:
            state[f"model.{name}"] = tensor
    return state


def gguf_names(hf_names, llm: LLMConfig) -> Dict[str, str]:
    """Hugging Face tensor name -> GGUF tensor name, from the gguf package's Qwen2 map."""
    gguf = _gguf()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, llm.layers)
    names = {}
    for hf_name in hf_names:
        mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise SfedgeError(f"no GGUF name for LLM tensor {hf_name!r}")
        names[hf_name] = mapped
    return names


@dataclass(frozen=True)
class GgufFile:
    path: str
    tensors: int
    bytes: int


def write_gguf(path: str, llm: LLMConfig, seed: int = 0, name: str = "sfedge") -> GgufFile:
    """Write ``path`` (F32, qwen2) with sfedge's seeded random weights of ``llm``; tensors are
    written one at a time and dropped, so the peak is the fp32 state once."""
    gguf = _gguf()
    if llm.hidden % llm.heads or llm.hidden // llm.heads != llm.head_dim:
        raise SfedgeError(f"llama.cpp's qwen2 needs hidden = heads x head_dim (got {llm.hidden} vs {llm.heads} x {llm.head_dim})")
    state = llm_state(llm, seed)
    names = gguf_names(state, llm)
    tmp = Path(f"{path}.partial")
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_context_length(llm.max_context)
    writer.add_embedding_length(llm.hidden)
    writer.add_block_count(llm.layers)
    writer.add_feed_forward_length(llm.intermediate)
    writer.add_head_count(llm.heads)
    writer.add_head_count_kv(llm.kv_heads)
    writer.add_key_length(llm.head_dim)
    writer.add_value_length(llm.head_dim)
    writer.add_rope_freq_base(llm.rope_theta)
    writer.add_layer_norm_rms_eps(llm.rms_norm_eps)
    tokens, types = vocabulary(llm)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(llm.bos_id)
    writer.add_eos_token_id(llm.eos_ids[0])
    writer.add_add_bos_token(False)
    order = list(state)
    for hf_name in order:
        tensor = state[hf_name]
        writer.add_tensor_info(names[hf_name], tuple(tensor.shape), tensor.numpy().dtype, tensor.numel() * 4)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf_name in order:
            writer.write_tensor_data(state.pop(hf_name).numpy())
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return GgufFile(path=str(path), tensors=len(order), bytes=os.path.getsize(path))


def read_tensor_shapes(path: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """GGUF tensor name -> (numpy-order shape, GGML type name), read back with gguf's reader."""
    reader = _gguf().GGUFReader(path)
    return {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name) for t in reader.tensors}


def expected_shapes(llm: LLMConfig) -> Dict[str, Tuple[int, ...]]:
    """What a qwen2 GGUF of this shape must hold (numpy order, GGUF names)."""
    q, kv = llm.heads * llm.head_dim, llm.kv_heads * llm.head_dim
    shapes = {"token_embd.weight": (llm.vocab_size, llm.hidden), "output_norm.weight": (llm.hidden,)}
    if not llm.tie_embeddings:
        shapes["output.weight"] = (llm.vocab_size, llm.hidden)
    for i in range(llm.layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (llm.hidden,), f"blk.{i}.ffn_norm.weight": (llm.hidden,),
            f"blk.{i}.attn_q.weight": (q, llm.hidden), f"blk.{i}.attn_q.bias": (q,),
            f"blk.{i}.attn_k.weight": (kv, llm.hidden), f"blk.{i}.attn_k.bias": (kv,),
            f"blk.{i}.attn_v.weight": (kv, llm.hidden), f"blk.{i}.attn_v.bias": (kv,),
            f"blk.{i}.attn_output.weight": (llm.hidden, q),
            f"blk.{i}.ffn_gate.weight": (llm.intermediate, llm.hidden), f"blk.{i}.ffn_up.weight": (llm.intermediate, llm.hidden),
            f"blk.{i}.ffn_down.weight": (llm.hidden, llm.intermediate),
        })
    return shapes
