"""The one manifest schema every backend writes and the runtime reads, plus the shared names.

Exporters and the runtime both import this module: component names, ExecuTorch method names and
the manifest fields live here and nowhere else.
"""
from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, List, Optional, Union

from sfedge.artifact_files import artifact_files, sha256_file  # noqa: F401 (sha256_file: re-exported)
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
class StageRecord:
    """One export stage of one component: wall seconds and the process's peak resident bytes during it."""

    component: str  # "vision_encoder", "projector[8 frames]", "llm", "model"
    stage: str  # "build", "quantize", "trace", "lower", "serialize", ...
    seconds: float
    peak_rss_bytes: Optional[int] = None  # None: not measured (manifests before the memory records)


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
    stages: List[StageRecord] = field(default_factory=list)  # empty in manifests written before stage records
    export_peak_rss_bytes: Optional[int] = None  # the export process's peak RSS (VmHWM / ru_maxrss)

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
        if not isinstance(data, dict):
            raise SfedgeError(f"{source} holds a JSON {type(data).__name__}, not an object: it is not an sfedge manifest (re-export the model)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SfedgeError(f"{source} has schema_version {version!r}; this sfedge reads version {SCHEMA_VERSION}: re-export the model")
        try:
            components = [
                ArtifactEntry(**{**entry, "inputs": [TensorSpec(**t) for t in entry["inputs"]],
                                 "outputs": [TensorSpec(**t) for t in entry["outputs"]]})
                for entry in data["components"]
            ]
            stages = [StageRecord(**stage) for stage in data.get("stages", [])]
            return Manifest(**{**data, "components": components, "stages": stages})
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


def contained_path(folder: Union[str, Path], name: object, source: str, what: str) -> Path:
    """``folder / name`` when ``name`` is a plain relative path that stays inside ``folder``; else a one-line
    SfedgeError naming ``source`` and the entry. Refused: non-strings, empty names, absolute paths,
    backslashes, ``..`` components, and paths whose symlinks (in any component) resolve outside ``folder``."""
    folder = Path(folder)
    reason = None
    if not isinstance(name, str) or not name.strip():
        reason = "is not a file name"
    elif name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive:
        reason = "is an absolute path"
    elif "\\" in name or "\x00" in name:
        reason = "contains a backslash or NUL"
    elif ".." in PurePosixPath(name).parts:
        reason = "contains '..'"
    else:
        root = folder.resolve()
        target = (folder / name).resolve()
        if target == root:
            reason = "names the folder itself"
        elif root not in target.parents:
            reason = f"resolves to {target}, outside {root} (a symlink?)"
    if reason:
        raise SfedgeError(f"{source}: {what} {name!r} {reason}; only files inside the folder may be named")
    return folder / name


def artifact_path(folder: Union[str, Path], name: object, what: str = "file") -> Path:
    """The path of a file an artifact folder's manifest names, refused unless it stays inside the folder."""
    return contained_path(folder, name, str(Path(folder) / MANIFEST_FILE), what)


def sha256_path(path: Union[str, Path]) -> str:
    """A file's sha256, or for a folder (.mlpackage) the sha256 over its files' relative names and hashes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for name, file in artifact_files(path):
        try:
            file_hash = sha256_file(file)
        except FileNotFoundError:  # gone since the listing: not part of the artifact
            continue
        digest.update(name.encode())
        digest.update(file_hash.encode())
    return digest.hexdigest()


def path_bytes(path: Union[str, Path]) -> int:
    return sum(file.stat().st_size for _, file in artifact_files(path))


@dataclass(frozen=True)
class CheckedFile:
    """One file a manifest names, with the sha256 the manifest records for it."""

    name: str
    what: str  # "component text_decoder", "data file of component text_decoder", "tokenizer"
    sha256: Any  # str when recorded; anything else is refused at verification


DECODE_GRAPH = "decode_graph"  # ArtifactEntry.extra key of a component's second, T = 1 graph (see DecodeGraph)


@dataclass(frozen=True)
class DecodeGraph:
    """A second graph of the text decoder for decode steps (T = 1), with the same inputs and outputs as the entry's
    own file (which serves prefill chunks, T > 1) and the same KV cache (ONNX recipe int8-channel-q4decode).
    Recorded as the entry's ``extra["decode_graph"]``: {"file", "sha256", "bytes", "quantization", "data_files",
    "data_sha256"}."""

    file: str
    sha256: str
    bytes: int
    quantization: Dict[str, Any]
    data_files: List[str] = field(default_factory=list)  # the graph's external data files (ONNX `<file>_data`)
    data_sha256: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def decode_graph(entry: ArtifactEntry) -> Optional[DecodeGraph]:
    """The entry's decode graph, or None (one graph serves prefill and decode); a malformed record is refused."""
    record = entry.extra.get(DECODE_GRAPH)
    if record is None:
        return None
    try:
        graph = DecodeGraph(**record)
    except TypeError as exc:
        raise SfedgeError(f"manifest entry {entry.component}: {DECODE_GRAPH} is not a decode graph record ({exc}); "
                          "re-export the model") from None
    if (not isinstance(graph.file, str) or not isinstance(graph.data_files, list)
            or not isinstance(graph.data_sha256, dict) or not isinstance(graph.quantization, dict)):
        raise SfedgeError(f"manifest entry {entry.component}: {DECODE_GRAPH} needs a file name, a quantization "
                          "mapping, a data_files list and a data_sha256 mapping; re-export the model")
    return graph


def _data_files(entry: ArtifactEntry) -> List[CheckedFile]:
    data_files = entry.extra.get("data_files", [])
    data_sha = entry.extra.get("data_sha256", {})
    if not isinstance(data_files, list) or not isinstance(data_sha, dict):
        raise SfedgeError(f"manifest entry {entry.component}: data_files must be a list and data_sha256 a mapping")
    checked = [CheckedFile(name, f"data file of component {entry.component}", data_sha.get(name)) for name in data_files]
    decode = decode_graph(entry)
    if decode is not None:
        what = f"decode graph of component {entry.component}"
        checked.append(CheckedFile(decode.file, what, decode.sha256))
        checked += [CheckedFile(name, f"data file of the {what}", decode.data_sha256.get(name)) for name in decode.data_files]
    return checked


def manifest_files(manifest: Manifest) -> List[CheckedFile]:
    """Every file the manifest names: component files (and a decode graph's file), ONNX external data files,
    the tokenizer."""
    files: Dict[str, CheckedFile] = {}
    for entry in manifest.components:
        files.setdefault(entry.file, CheckedFile(entry.file, f"component {entry.component}", entry.sha256))
        for item in _data_files(entry):
            files.setdefault(item.name, item)
    tokenizer = manifest.tokenizer.get("file", TOKENIZER_FILE) if isinstance(manifest.tokenizer, dict) else None
    files.setdefault(tokenizer, CheckedFile(tokenizer, "tokenizer", manifest.tokenizer.get("sha256") if tokenizer else None))
    return list(files.values())


def verify_artifacts(folder: Union[str, Path], manifest: Manifest, use_cache: bool = True) -> None:
    """Every file the manifest names (component files, ONNX external data, tokenizer.json) stays inside
    ``folder``, exists, and has the sha256 the manifest records.

    Every path is checked for containment before anything is hashed. A verdict is remembered per file in
    the verification cache (sfedge.hash_cache), keyed by its absolute path, size, mtime, ctime, inode and
    the expected sha256, so a second open of an unchanged folder hashes nothing; any change of those
    rehashes it. Limit: a file rewritten in place with the same size whose mtime and ctime were both
    restored (which needs a clock change or raw disk access) would keep a cached verdict; pass
    ``use_cache=False`` (``SFEDGE_VERIFY_CACHE=0``) to always hash.
    """
    from sfedge import hash_cache

    folder = Path(folder)
    files = manifest_files(manifest)
    paths = [artifact_path(folder, item.name, item.what) for item in files]  # every path, before any hashing
    for item, path in zip(files, paths):
        if not path.exists():
            raise SfedgeError(f"{path} is missing: the manifest names it as {item.what} (re-export, or copy the whole folder)")
        if path.is_dir() and not item.name.endswith(".mlpackage"):
            raise SfedgeError(f"{path} is a folder, not a file: the manifest names it as {item.what} (only .mlpackage artifacts are folders)")
        if path.is_dir():
            _check_tree_contained(folder, path)
        if not isinstance(item.sha256, str) or not item.sha256:
            raise SfedgeError(f"{folder / MANIFEST_FILE} records no sha256 for {item.what} {item.name!r} "
                              f"(written by an older sfedge?): re-export it, or pass --no-verify to run it anyway")
        if not hash_cache.verified(path, item.sha256, sha256_path, use_cache=use_cache):
            raise SfedgeError(f"{path} does not match the sha256 in {MANIFEST_FILE} ({item.what}): the file changed after export "
                              f"(re-export it, or pass --no-verify to run it anyway)")


def _check_tree_contained(folder: Path, tree: Path) -> None:
    """No symlink inside a folder artifact (.mlpackage) may lead outside the artifact folder."""
    root = folder.resolve()
    for path in tree.rglob("*"):
        if path.is_symlink() and root not in path.resolve().parents:
            raise SfedgeError(f"{path} is a symlink to {path.resolve()}, outside {root}; only files inside the folder may be named")


def check_weights_fingerprint(manifest: Manifest) -> None:
    """Recompute the fingerprint of the weights the manifest was exported from and compare it with the
    recorded one: a checkpoint changed at the same path must not silently give a different reference."""
    from sfedge.models.weights import WeightsSource

    recorded = manifest.weights.get("fingerprint") if isinstance(manifest.weights, dict) else None
    if not isinstance(recorded, str) or not recorded:
        raise SfedgeError("the manifest records no weights fingerprint: re-export the model with this sfedge")
    source = WeightsSource.from_dict(manifest.weights)
    current = source.fingerprint()
    if current != recorded:
        where = ", ".join(p for p in (source.llm_dir, source.vision_path, source.projector_path) if p) or f"random seed {source.seed}"
        raise SfedgeError(f"the weights the manifest was exported from ({where}) changed since export (fingerprint "
                          f"{current[:12]} != recorded {recorded[:12]}): re-export, or restore the original checkpoint")
