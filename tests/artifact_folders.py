"""A small fake ONNX artifact folder with a matching manifest, shared by the integrity and verification-cache tests."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import sfedge.manifest as manifest_module
from sfedge import hash_cache
from sfedge.config import get_preset
from sfedge.manifest import ArtifactEntry, Manifest, TensorSpec
from sfedge.models import WeightsSource

FILES = {"vision_encoder.onnx": b"vision" * 50, "projector.onnx": b"projector" * 40, "embed_tokens.onnx": b"embed" * 30,
         "decoder_model_merged.onnx": b"decoder" * 60, "decoder_model_merged.onnx_data": b"weights" * 10_000}  # past hash_cache.SMALL_FILE_BYTES: signed by stat
TOKENIZER = b'{"model": "tiny"}'


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test gets its own verification cache (and never touches ~/.cache)."""
    monkeypatch.setenv(hash_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))


def _entry(component: str, file: str, sha: str, **extra) -> ArtifactEntry:
    return ArtifactEntry(component=component, file=file, sha256=sha, bytes=0, inputs=[TensorSpec("x", [1], "float32")],
                         outputs=[], quantization={}, method=component, extra=extra)


def _manifest(backend: str = "onnx", files: dict | None = None, **overrides) -> Manifest:
    files = FILES if files is None else files
    data = "decoder_model_merged.onnx_data"
    components = [_entry("vision_encoder", "vision_encoder.onnx", _sha(files["vision_encoder.onnx"]), encoder_batch=1),
                  _entry("projector", "projector.onnx", _sha(files["projector.onnx"]), frames=8),
                  _entry("token_embedding", "embed_tokens.onnx", _sha(files["embed_tokens.onnx"])),
                  _entry("text_decoder", "decoder_model_merged.onnx", _sha(files["decoder_model_merged.onnx"]),
                         data_files=[data], data_sha256={data: _sha(files[data])})]
    fields = dict(backend=backend, recipe="fp32", preset="tiny", model_config=get_preset("tiny").to_dict(),
                  weights={**WeightsSource().to_dict(), "fingerprint": WeightsSource().fingerprint()}, token_budget={},
                  export_options={"max_context": 128, "frames": 8},
                  tokenizer={"file": "tokenizer.json", "sha256": _sha(TOKENIZER)}, components=components)
    fields.update(overrides)
    return Manifest(**fields)


def _folder(tmp_path: Path, manifest: Manifest | None = None, name: str = "art") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for file, data in FILES.items():
        (folder / file).write_bytes(data)
    (folder / "tokenizer.json").write_bytes(TOKENIZER)
    (manifest or _manifest()).write(folder)
    return folder


def _rename_file(manifest: Manifest, component: str, file: str, sha: str) -> Manifest:
    for entry in manifest.components:
        if entry.component == component:
            entry.file, entry.sha256 = file, sha
    return manifest


def _no_hashing(monkeypatch):
    def refuse(path):
        raise AssertionError(f"hashed {path} before refusing the manifest")

    monkeypatch.setattr(manifest_module, "sha256_file", refuse)


def _count_hashing(monkeypatch) -> list:
    calls = []
    real = manifest_module.sha256_file

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(manifest_module, "sha256_file", counting)
    return calls
