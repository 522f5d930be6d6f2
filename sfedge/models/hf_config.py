"""Read a Hugging Face Qwen2/Qwen2.5 folder's config.json (and tokenizer) into an LLMConfig."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sfedge.config import LLMConfig
from sfedge.errors import SfedgeError

SPECIAL_NAMES = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TURN_END = "<|im_end|>"  # the ChatML template ends every turn with it: always an EOS id
POSITIVE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SfedgeError(f"{path} is missing: an LLM folder needs a Hugging Face config.json") from None
    except (ValueError, OSError) as exc:
        raise SfedgeError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SfedgeError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _check_positive(cfg: dict, path: Path) -> None:
    for name in POSITIVE_FIELDS + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = cfg.get(name)
        if value is None and name not in POSITIVE_FIELDS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SfedgeError(f"{path} has {name} = {value!r}; expected a positive integer")


def _eos_list(value) -> tuple:
    return tuple(int(i) for i in value) if isinstance(value, list) else (int(value),)


def _generation_eos(path: Path) -> tuple:
    """generation_config.json's eos_token_id (what transformers' generate stops at), when present."""
    file = path / "generation_config.json"
    if not file.exists():
        return ()
    value = _read_json(file).get("eos_token_id")
    try:
        return () if value is None else _eos_list(value)
    except (TypeError, ValueError):
        raise SfedgeError(f"{file} has a bad eos_token_id {value!r}") from None


def with_turn_end_eos(eos_ids: tuple, special_tokens: tuple) -> tuple:
    """A base (non-instruct) Qwen config names only <|endoftext|> as EOS; the ChatML template ends the
    answer with <|im_end|>, so that id is always an EOS id too."""
    turn_end = dict(special_tokens).get(TURN_END)
    return eos_ids if turn_end is None or turn_end in eos_ids else (turn_end, *eos_ids)


def llm_config_from_hf(folder: str, base: LLMConfig) -> LLMConfig:
    path = Path(folder)
    if not path.is_dir():
        raise SfedgeError(f"LLM folder {folder} does not exist or is not a folder (expected a Hugging Face Qwen2.5 folder)")
    cfg = _read_json(path / "config.json")
    model_type = cfg.get("model_type")
    if model_type not in ("qwen2", None):
        raise SfedgeError(f"{path / 'config.json'} has model_type {model_type!r}; sfedge loads Qwen2/Qwen2.5 (qwen2)")
    _check_positive(cfg, path / "config.json")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id", list(base.eos_ids))
        eos_ids = tuple(dict.fromkeys(_eos_list(eos) + _generation_eos(path)))
        rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", base.rope_theta)
        llm = dataclasses.replace(
            base,
            hidden=hidden,
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", base.rms_norm_eps)),
            rope_theta=float(rope_theta),
            max_context=int(cfg.get("max_position_embeddings", base.max_context)),
            bos_id=int(cfg.get("bos_token_id") if cfg.get("bos_token_id") is not None else base.bos_id),
            eos_ids=eos_ids,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SfedgeError(f"{path / 'config.json'} lacks or has a bad Qwen2 field ({exc})") from None
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.exists():
        added = {tok["content"]: tok["id"] for tok in _read_json(tokenizer_file).get("added_tokens", [])}
        specials = tuple((name, added[name]) for name in SPECIAL_NAMES if name in added)
        if specials:
            llm = dataclasses.replace(llm, special_tokens=specials)
    return dataclasses.replace(llm, eos_ids=with_turn_end_eos(llm.eos_ids, llm.special_tokens))
