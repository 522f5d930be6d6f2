"""The one manifest schema every backend writes and the runtime reads, plus the shared names.

Exporters and the runtime both import this module: component names, ExecuTorch method names and
the manifest fields live here and nowhere else.
"""
from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from sfedge.errors import SfedgeError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"


class Component(str, enum.Enum):
    VISION_ENCODER = "vision_encoder"
    PROJECTOR = "projector"
    TOKEN_EMBEDDING = "token_embedding"
    TEXT_DECODER = "text_decoder"


class Backend(str, enum.Enum):
    EAGER = "eager"
    EXECUTORCH = "executorch"
    ONNX = "onnx"
    COREML = "coreml"
    EXECUTORCH_COREML = "executorch-coreml"


# ExecuTorch multimodal method names (the runners of ExecuTorch's LLaVA example read these).
METHOD_VISION_ENCODER = "vision_encoder"
METHOD_TOKEN_EMBEDDING = "token_embedding"
METHOD_TEXT_DECODER = "text_decoder"
CONSTANT_METHODS = ("get_max_seq_len", "get_max_context_len", "get_bos_id", "get_eos_ids", "get_vocab_size", "use_kv_cache")


@dataclass
class TensorSpec:
    """A tensor at an artifact's boundary; dims are ints or symbolic names such as ``"tokens"``."""

    name: str
    shape: List[Union[int, str]]
    dtype: str


@dataclass
class ArtifactEntry:
    """One component inside an artifact file (several components may share a file, e.g. llm.pte)."""

    component: str
    file: str
    sha256: str
    bytes: int
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    quantization: Dict[str, Any]
    method: Optional[str] = None  # method / function name inside the file, where the format has them
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    backend: str
    recipe: str
    preset: str
    model_config: Dict[str, Any]
    weights: Dict[str, Any]  # WeightsSource.to_dict() plus "fingerprint"
    token_budget: Dict[str, Any]
    export_options: Dict[str, Any]  # frames, max_context, prefill_chunk, encoder_batch, ...
    tokenizer: Dict[str, Any]  # {"file": "tokenizer.json", "kind": ..., "special_tokens": {...}}
    components: List[ArtifactEntry]
    sfedge_version: str = ""
    git_commit: str = ""
    created: str = ""
    library_versions: Dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def component(self, name: Union[str, Component]) -> ArtifactEntry:
        key = name.value if isinstance(name, Component) else name
        for entry in self.components:
            if entry.component == key:
                return entry
        known = ", ".join(e.component for e in self.components)
        raise SfedgeError(f"manifest has no component {key!r} (it lists: {known})")

    def components_of(self, name: Union[str, Component]) -> List[ArtifactEntry]:
        """Every entry of a component (the projector has one per exported frame count)."""
        key = name.value if isinstance(name, Component) else name
        return [entry for entry in self.components if entry.component == key] or [self.component(key)]

    def projectors(self) -> Dict[int, ArtifactEntry]:
        """frame count -> projector entry; the first is the export's default frame count."""
        return {projector_frames(entry): entry for entry in self.components_of(Component.PROJECTOR)}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_FILE
        path.write_text(self.to_json())
        return path

    @staticmethod
    def from_dict(data: dict, source: str = "manifest") -> "Manifest":
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SfedgeError(f"{source} has schema_version {version!r}; this sfedge reads version {SCHEMA_VERSION}: re-export the model")
        try:
            components = [
                ArtifactEntry(**{**entry, "inputs": [TensorSpec(**t) for t in entry["inputs"]],
                                 "outputs": [TensorSpec(**t) for t in entry["outputs"]]})
                for entry in data["components"]
            ]
            return Manifest(**{**data, "components": components})
        except (KeyError, TypeError) as exc:
            raise SfedgeError(f"{source} does not follow the sfedge manifest schema ({exc})") from None


def projector_frames(entry: ArtifactEntry) -> int:
    """The static frame count a projector entry takes: ``extra.frames``, else its input's first dim."""
    frames = entry.extra.get("frames", entry.inputs[0].shape[0] if entry.inputs else None)
    if not isinstance(frames, int):
        raise SfedgeError(f"the manifest's projector entry {entry.file} has no static frame count; re-export the model")
    return frames


def read_manifest(folder: Union[str, Path]) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise SfedgeError(f"{folder} is not an artifact folder (expected a folder written by `sfedge export`)")
    if not path.exists():
        raise SfedgeError(f"{folder} has no {MANIFEST_FILE}: it was not written by `sfedge export` (or the export was interrupted)")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise SfedgeError(f"{path} is not valid JSON ({exc})") from None
    return Manifest.from_dict(data, str(path))


def sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: Union[str, Path]) -> str:
    """A file's sha256, or for a folder (.mlpackage) the sha256 over its files' relative names and hashes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def path_bytes(path: Union[str, Path]) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def verify_artifacts(folder: Union[str, Path], manifest: Manifest) -> None:
    """Every file the manifest names exists and has the recorded sha256."""
    folder = Path(folder)
    checked: Dict[str, str] = {}
    for entry in manifest.components:
        for name in [entry.file, *entry.extra.get("data_files", [])]:
            if name in checked:
                continue
            path = folder / name
            if not path.exists():
                raise SfedgeError(f"{path} is missing: the manifest names it (re-export, or copy the whole folder)")
            checked[name] = sha256_path(path)
        if checked[entry.file] != entry.sha256:
            raise SfedgeError(f"{folder / entry.file} does not match the sha256 in {MANIFEST_FILE}: the file changed after export "
                              f"(re-export it, or pass --no-verify to run it anyway)")
