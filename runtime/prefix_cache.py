"""A video's prefix on disk: what a phone app keeps so a later question skips decode, encode and projection.

One safetensors file (never pickle): ``visual`` [visual tokens, hidden] (the projected visual
tokens), ``prefix_ids`` (the template's token ids before the video) and, where the session exposes
its cache (``save_kv``), ``kv.layer{i}.key`` / ``kv.layer{i}.value`` [1, kv_heads, prefix, head_dim].
The header binds it to the video's content (sha256, never its name or placeholder tokens), the
frame sampling (policy, fps, frame count) and the model: the artifact folder's manifest hash, or
for an eager model its config + weights source. A file that does not match is refused with one
line naming the mismatch. Without a KV cache (ExecuTorch keeps it in mutable buffers), loading
re-prefills the prefix from the saved visual tokens: only decode, encode and projection are saved.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch

from sfedge.errors import SfedgeError
from sfedge.manifest import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from sfedge.runtime.chat import VideoChat
    from sfedge.runtime.pipeline import Pipeline, VideoOptions

FORMAT = "sfedge-video-prefix/1"
KV_PREFIX = "kv."


def model_fingerprint(config_dict: dict, backend: str, extra: dict) -> str:
    """sha256 over what makes a prefix's visual tokens and KV cache: the model config, the backend and
    the weights (an artifact folder's manifest, which holds every file's sha256; or the eager weights source)."""
    config = dict(config_dict, slowfast={k: v for k, v in config_dict.get("slowfast", {}).items() if k != "frames"})
    # the default frame count is not part of the model (the key checks the frames actually sampled)
    text = json.dumps({"config": config, "backend": backend, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class PrefixKey:
    """What a saved prefix must match (each field is checked, and a mismatch is named)."""

    video_sha256: str
    frames: int
    policy: str
    sample_fps: float
    model: str  # model_fingerprint

    @staticmethod
    def for_video(pipeline: "Pipeline", video: Path, options: "VideoOptions") -> "PrefixKey":
        if not video.is_file():
            raise SfedgeError(f"video {video} does not exist or is not a file")
        return PrefixKey(video_sha256=sha256_file(video), frames=pipeline.frames_to_sample(options), policy=options.policy,
                         sample_fps=float(options.sample_fps) if options.policy == "fps" else 0.0,
                         model=pipeline.fingerprint)

    def to_header(self) -> Dict[str, str]:
        return {name: str(value) for name, value in asdict(self).items()}

    def mismatches(self, header: Dict[str, str]) -> List[str]:
        described = {"video_sha256": "another video", "frames": "another frame count", "policy": "another sampling policy",
                     "sample_fps": "another sampling fps", "model": "another export/model"}
        out = []
        for field in fields(self):
            mine, theirs = str(getattr(self, field.name)), header.get(field.name)
            if mine != theirs:
                short = lambda v: (v[:12] + "...") if v and len(v) > 16 else v  # noqa: E731
                out.append(f"{described[field.name]} ({field.name} {short(theirs)}, this run {short(mine)})")
        return out


def save_prefix(chat: "VideoChat", path: Path) -> Path:
    from safetensors.torch import save_file

    key: PrefixKey = chat._source
    tensors = {"visual": chat.visual.detach().float().contiguous(),
               "prefix_ids": torch.tensor(chat.before, dtype=torch.long)}
    kv = chat.session.save_kv(chat.prefix_length)
    if kv is not None:
        tensors.update({KV_PREFIX + name: value.contiguous() for name, value in kv.items()})
    header = {"format": FORMAT, **key.to_header(), "backend": chat.session.backend,
              "prefix_length": str(chat.prefix_length), "has_kv": "1" if kv is not None else "0"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path


def load_prefix(path: Path, key: PrefixKey, before: List[int]) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
    """(visual tokens, KV tensors or None), after checking the header against ``key``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SfedgeError(f"{path} is not a readable safetensors file ({exc})") from None
    if header.get("format") != FORMAT:
        raise SfedgeError(f"{path} is not a saved video prefix (format {header.get('format')!r}, expected {FORMAT!r})")
    wrong = key.mismatches(header)
    if wrong:
        raise SfedgeError(f"{path} is a stale video prefix: saved for {'; '.join(wrong)}; delete it or pass another --cache")
    if "visual" not in tensors or tensors.get("prefix_ids") is None or tensors["prefix_ids"].tolist() != list(before):
        raise SfedgeError(f"{path}: the saved prompt prefix does not match this tokenizer/template; delete it")
    kv = {name[len(KV_PREFIX):]: value for name, value in tensors.items() if name.startswith(KV_PREFIX)}
    return tensors["visual"], (kv if header.get("has_kv") == "1" else None)
