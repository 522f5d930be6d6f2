"""Where weights come from: seeded random tensors of the true shapes, or local checkpoints.

Everything is built on the meta device and filled with ``load_state_dict(assign=True)``, so a 3B
model never exists twice in memory: safetensors files are memory-mapped and each tensor is
converted once. Key mappings (documented in README):

* LLM: a Hugging Face Qwen2/Qwen2.5 folder (config.json + model.safetensors or sharded
  model-0000x-of-0000y.safetensors with model.safetensors.index.json).
  ``model.embed_tokens.weight`` -> token_embedding ``embed_tokens.weight``; ``model.<rest>`` ->
  text_decoder ``<rest>``; ``lm_head.weight`` -> text_decoder ``lm_head.weight`` (the embedding when tied).
* Vision: a .safetensors file or a folder holding one. Oryx-ViT/timm keys (``patch_embed.proj``,
  ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, any prefix) map
  as they are; HF SigLIP keys (``[vision_model.]embeddings.*``, ``[vision_model.]encoder.layers.N.*``)
  map with q/k/v concatenated into ``attn.qkv``. Final norms and pooling heads are dropped.
* Projector: ``[model.]mm_projector.{0,2}.{weight,bias}`` (LLaVA) or ``mlp.{0,2}.*``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from sfedge.errors import SfedgeError
from sfedge.manifest import contained_path

RANDOM_LOGIT_STD = 3.0  # embedding std = this / sqrt(hidden): peaked next-token distributions


@dataclass(frozen=True)
class WeightsSource:
    """Per component: a local checkpoint path, or seeded random weights when None."""

    seed: int = 0
    llm_dir: Optional[str] = None
    vision_path: Optional[str] = None
    projector_path: Optional[str] = None

    @property
    def is_random(self) -> bool:
        return not (self.llm_dir or self.vision_path or self.projector_path)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "llm_dir": self.llm_dir, "vision_path": self.vision_path,
                "projector_path": self.projector_path}

    @staticmethod
    def from_dict(data: dict) -> "WeightsSource":
        return WeightsSource(seed=int(data.get("seed", 0)), llm_dir=data.get("llm_dir"),
                             vision_path=data.get("vision_path"), projector_path=data.get("projector_path"))

    def fingerprint(self) -> str:
        """sha256 over the source description and the bytes of every local checkpoint file."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode())
        for path in (self.llm_dir, self.vision_path, self.projector_path):
            if path:
                for file in sorted(_safetensors_files(Path(path), "weights")):
                    digest.update(file.name.encode())
                    with open(file, "rb") as handle:
                        for block in iter(lambda: handle.read(1 << 24), b""):
                            digest.update(block)
        return digest.hexdigest()


# --- random -----------------------------------------------------------------------------------

def random_state(module: nn.Module, generator: torch.Generator, dtype: torch.dtype,
                 embedding_std: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """Seeded tensors for every parameter of a (meta) module: norms 1/0, matrices N(0, 1/fan_in)
    (variance preserving, so every layer changes the residual stream as a trained one does), biases
    N(0, 0.02), token embeddings N(0, embedding_std)."""
    state = {}
    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_norm = re.search(r"(norm|layernorm)\d*\.", name) is not None
        if is_norm:
            tensor = torch.ones(param.shape, dtype=dtype) if leaf == "weight" else torch.zeros(param.shape, dtype=dtype)
        else:
            if name == "pos_embed":
                std = 0.02
            elif embedding_std and "embed_tokens" in name:
                std = embedding_std
            elif param.dim() >= 2:
                std = (param[0].numel()) ** -0.5  # 1 / sqrt(fan_in) (conv: in_channels * k * k)
            else:
                std = 0.02
            tensor = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator).to(dtype)
        state[name] = tensor
    return state


# --- safetensors helpers ----------------------------------------------------------------------

def _safetensors_files(path: Path, what: str) -> list[Path]:
    if not path.exists():
        raise SfedgeError(f"{what} checkpoint {path} does not exist; pass a .safetensors file or a folder holding one")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SfedgeError(f"{what} checkpoint {path} is not a .safetensors file (pickle checkpoints are refused: convert with safetensors first)")
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()), key=str)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SfedgeError(f"{index} is not a valid safetensors index ({exc})") from None
        return [contained_path(path, shard, str(index), "weight_map shard") for shard in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SfedgeError(f"no .safetensors file in {what} folder {path}")
    return files


def read_safetensors(files: Iterable[Path]) -> Dict[str, tuple[Path, Callable[[], torch.Tensor]]]:
    """name -> (file, loader): tensors are read lazily from memory-mapped files."""
    from safetensors import safe_open

    entries: Dict[str, tuple[Path, Callable[[], torch.Tensor]]] = {}
    for file in files:
        if not file.exists():
            raise SfedgeError(f"safetensors shard {file} is missing (named by the index file)")
        try:
            handle = safe_open(str(file), framework="pt")
            names = list(handle.keys())
        except Exception as exc:  # safetensors raises several types for a corrupt header
            raise SfedgeError(f"{file} is not a readable safetensors file ({exc})") from None
        for name in names:
            entries[name] = (file, (lambda h=handle, n=name: h.get_tensor(n)))
    return entries


def assign_state(module: nn.Module, tensors: Dict[str, tuple[Path, Callable[[], torch.Tensor]]],
                 dtype: torch.dtype, component: str) -> None:
    """Shape-check every tensor against the module, convert once, and assign (no second copy)."""
    expected = dict(module.named_parameters())
    missing = [name for name in expected if name not in tensors]
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise SfedgeError(f"{component} checkpoint lacks {len(missing)} tensors the model needs: {shown}")
    state = {}
    for name, param in expected.items():
        file, load = tensors[name]
        tensor = load()
        if tuple(tensor.shape) != tuple(param.shape):
            raise SfedgeError(
                f"{component} tensor {name!r} in {file} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(param.shape)}: the checkpoint does not match the preset"
            )
        state[name] = tensor.to(dtype)
    module.load_state_dict(state, strict=False, assign=True)


# --- key mappings -----------------------------------------------------------------------------

def map_llm_keys(entries: dict) -> tuple[dict, dict]:
    """HF Qwen2 names -> (token_embedding entries, text_decoder entries)."""
    embedding, decoder = {}, {}
    for name, entry in entries.items():
        if name == "model.embed_tokens.weight":
            embedding["embed_tokens.weight"] = entry
        elif name.startswith("model."):
            decoder[name[len("model."):]] = entry
        elif name == "lm_head.weight":
            decoder[name] = entry
    return embedding, decoder


_TIMM_ROOT = re.compile(r"(?:^|\.)((?:patch_embed\.|pos_embed|blocks\.).*)$")
_SIGLIP_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.(.+)$")
_SIGLIP_RENAMES = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
                   "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def map_vision_keys(entries: dict) -> dict:
    """Oryx-ViT/timm or HF SigLIP names -> VisionEncoder names (q/k/v fused for SigLIP)."""
    mapped: dict = {}
    qkv_parts: dict = {}
    for name, (file, load) in entries.items():
        if re.search(r"(?:^|\.)embeddings\.patch_embedding\.", name):
            mapped["patch_embed.proj." + name.rsplit(".", 1)[-1]] = (file, load)
        elif re.search(r"(?:^|\.)embeddings\.position_embedding\.weight$", name):
            mapped["pos_embed"] = (file, (lambda ld=load: ld().unsqueeze(0)))
        elif (match := _SIGLIP_LAYER.search(name)):
            layer, rest = match.groups()
            qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
            if qkv:
                qkv_parts.setdefault((layer, qkv.group(2)), {})[qkv.group(1)] = (file, load)
                continue
            for old, new in _SIGLIP_RENAMES.items():
                if rest.startswith(old + "."):
                    mapped[f"blocks.{layer}.{new}{rest[len(old):]}"] = (file, load)
        elif (match := _TIMM_ROOT.search(name)):
            mapped[match.group(1)] = (file, load)
    for (layer, leaf), parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            continue
        file = parts["q"][0]
        mapped[f"blocks.{layer}.attn.qkv.{leaf}"] = (
            file, (lambda p=parts: torch.cat([p["q"][1](), p["k"][1](), p["v"][1]()], dim=0)))
    return mapped


def map_projector_keys(entries: dict) -> dict:
    mapped = {}
    for name, entry in entries.items():
        match = re.search(r"(?:mm_projector|mlp)\.([02]\.(?:weight|bias))$", name) or re.fullmatch(r"([02]\.(?:weight|bias))", name)
        if match:
            mapped["mlp." + match.group(1)] = entry
    return mapped


def load_local(module: nn.Module, path: str, component: str, mapper: Callable[[dict], dict], dtype: torch.dtype) -> None:
    entries = read_safetensors(_safetensors_files(Path(path), component))
    assign_state(module, mapper(entries), dtype, component)


def checkpoint_size(path: str) -> int:
    return sum(os.path.getsize(f) for f in _safetensors_files(Path(path), "weights"))
