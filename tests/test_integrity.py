"""Artifact integrity: every path a manifest names stays inside its folder, every file it names is hashed and
compared (component files, ONNX external data, tokenizer.json), the weights fingerprint, the one backend table, kv_dtype, and the executorch-coreml / Core ML explanations."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sfedge.errors import SfedgeError
from sfedge.manifest import (Backend, artifact_path, check_weights_fingerprint,
                             read_manifest, verify_artifacts)
from sfedge.models import WeightsSource

from artifact_folders import (FILES, TOKENIZER, _count_hashing, _entry, _folder, _manifest, _no_hashing,  # noqa: F401
                              _own_cache, _rename_file, _sha)  # _own_cache: the autouse fixture



def test_a_well_formed_folder_verifies(tmp_path):
    folder = _folder(tmp_path)
    verify_artifacts(folder, read_manifest(folder))


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/passwd", "/usr", "/", "sub/../../outside.onnx", "a\\b.onnx",
                                  ".", "", "C:/x.onnx"])
def test_escaping_names_are_refused_before_anything_is_hashed(tmp_path, monkeypatch, name):
    (tmp_path / "outside.onnx").write_bytes(b"outside")
    real = _sha(Path(name).read_bytes()) if name == "/etc/passwd" and Path(name).is_file() else _sha(b"outside")
    folder = _folder(tmp_path, _rename_file(_manifest(), "vision_encoder", name, real))
    _no_hashing(monkeypatch)
    with pytest.raises(SfedgeError, match=r"manifest\.json: component vision_encoder .* only files inside the folder") as info:
        verify_artifacts(folder, read_manifest(folder))
    assert "\n" not in str(info.value)


def test_symlinks_that_leave_the_folder_are_refused(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.onnx").write_bytes(FILES["vision_encoder.onnx"])
    folder = _folder(tmp_path)
    (folder / "vision_encoder.onnx").unlink()
    (folder / "vision_encoder.onnx").symlink_to(outside / "model.onnx")  # same bytes, same sha256
    _no_hashing(monkeypatch)
    with pytest.raises(SfedgeError, match=r"component vision_encoder 'vision_encoder.onnx' resolves to .*outside"):
        verify_artifacts(folder, read_manifest(folder))
    # a symlinked folder component that leads outside
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SfedgeError, match="'sub/model.onnx' resolves to"):
        artifact_path(folder, "sub/model.onnx", "component vision_encoder")


def test_a_symlink_inside_the_folder_is_allowed(tmp_path):
    folder = _folder(tmp_path)
    (folder / "blobs").mkdir()
    (folder / "vision_encoder.onnx").rename(folder / "blobs" / "v.onnx")
    (folder / "vision_encoder.onnx").symlink_to(Path("blobs") / "v.onnx")
    verify_artifacts(folder, read_manifest(folder))


def test_data_files_and_tokenizer_are_contained_too(tmp_path, monkeypatch):
    (tmp_path / "secret").write_bytes(b"x")
    manifest = _manifest()
    manifest.components[3].extra["data_files"] = ["../secret"]
    manifest.components[3].extra["data_sha256"] = {"../secret": _sha(b"x")}
    folder = _folder(tmp_path, manifest)
    _no_hashing(monkeypatch)
    with pytest.raises(SfedgeError, match=r"data file of component text_decoder '../secret' contains '..'"):
        verify_artifacts(folder, read_manifest(folder))
    other = _folder(tmp_path, name="tok")
    (other / "tokenizer.json").unlink()
    (other / "tokenizer.json").symlink_to(tmp_path / "secret")
    with pytest.raises(SfedgeError, match=r"tokenizer 'tokenizer.json' resolves to"):
        verify_artifacts(other, read_manifest(other))


def test_sessions_refuse_escaping_paths_even_without_verification(tmp_path):
    pytest.importorskip("onnxruntime")
    from sfedge.runtime.sessions import SessionOptions, open_session

    (tmp_path / "outside.onnx").write_bytes(b"outside")
    folder = _folder(tmp_path, _rename_file(_manifest(), "vision_encoder", "../outside.onnx", _sha(b"outside")))
    with pytest.raises(SfedgeError, match=r"'../outside.onnx' contains '..'; only files inside the folder"):
        open_session(folder, SessionOptions(verify=False))


def test_executorch_session_refuses_escaping_paths_without_verification(tmp_path):
    pytest.importorskip("executorch")
    from sfedge.runtime.sessions import SessionOptions, open_session

    manifest = _rename_file(_manifest("executorch"), "vision_encoder", "/etc/hostname", "0" * 64)
    folder = _folder(tmp_path, manifest)
    with pytest.raises(SfedgeError, match=r"'/etc/hostname' is an absolute path"):
        open_session(folder, SessionOptions(verify=False))


@pytest.mark.parametrize("victim", ["decoder_model_merged.onnx_data", "tokenizer.json"])
def test_external_data_and_tokenizer_are_compared_with_the_manifest(tmp_path, victim):
    folder = _folder(tmp_path)
    data = bytearray((folder / victim).read_bytes())
    data[3] ^= 0xFF
    (folder / victim).write_bytes(bytes(data))
    with pytest.raises(SfedgeError, match=f"{victim} does not match the sha256"):
        verify_artifacts(folder, read_manifest(folder))


def test_a_manifest_without_recorded_hashes_is_refused(tmp_path):
    manifest = _manifest(tokenizer={"file": "tokenizer.json"})
    folder = _folder(tmp_path, manifest)
    with pytest.raises(SfedgeError, match="records no sha256 for tokenizer 'tokenizer.json'.*--no-verify"):
        verify_artifacts(folder, read_manifest(folder))
    manifest = _manifest()
    del manifest.components[3].extra["data_sha256"]
    other = _folder(tmp_path, manifest, name="nodata")
    with pytest.raises(SfedgeError, match="records no sha256 for data file of component text_decoder"):
        verify_artifacts(other, read_manifest(other))


def test_a_folder_named_as_a_file_is_refused(tmp_path):
    folder = _folder(tmp_path)
    (folder / "blobs").mkdir()
    (folder / "blobs" / "x").write_bytes(b"x")
    manifest = _rename_file(_manifest(), "vision_encoder", "blobs", "0" * 64)
    manifest.write(folder)
    with pytest.raises(SfedgeError, match="is a folder, not a file"):
        verify_artifacts(folder, read_manifest(folder))


def test_artifact_entry_records_external_data_hashes(tmp_path):
    from sfedge.export.common import artifact_entry

    for file, data in FILES.items():
        (tmp_path / file).write_bytes(data)
    entry = artifact_entry(tmp_path, "text_decoder", "decoder_model_merged.onnx", [], [], {},
                           data_files=["decoder_model_merged.onnx_data"])
    assert entry.extra["data_sha256"] == {"decoder_model_merged.onnx_data": _sha(FILES["decoder_model_merged.onnx_data"])}


# --- weights ------------------------------------------------------------------------------------------

def test_weights_fingerprint_is_checked(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "projector.safetensors"
    save_file({"mlp.0.weight": torch.ones(2, 2)}, str(path))
    source = WeightsSource(projector_path=str(path))
    manifest = _manifest(weights={**source.to_dict(), "fingerprint": source.fingerprint()})
    check_weights_fingerprint(manifest)
    save_file({"mlp.0.weight": torch.zeros(2, 2)}, str(path))  # same path, other weights
    with pytest.raises(SfedgeError, match=r"weights the manifest was exported from \(.*projector.safetensors\) changed"):
        check_weights_fingerprint(manifest)
    check_weights_fingerprint(_manifest())  # random weights: the seed is the source
    with pytest.raises(SfedgeError, match="changed since export"):
        check_weights_fingerprint(_manifest(weights={**WeightsSource(seed=1).to_dict(),
                                                     "fingerprint": WeightsSource(seed=0).fingerprint()}))


def test_parity_refuses_a_reference_rebuilt_from_changed_weights(tmp_path, monkeypatch):
    """run_parity checks the fingerprint before it opens any session (no wrong reference is built)."""
    from safetensors.torch import save_file

    import sfedge.runtime.parity as parity

    path = tmp_path / "projector.safetensors"
    save_file({"mlp.0.weight": torch.ones(2, 2)}, str(path))
    source = WeightsSource(projector_path=str(path))
    folder = _folder(tmp_path, _manifest(weights={**source.to_dict(), "fingerprint": source.fingerprint()}))
    save_file({"mlp.0.weight": torch.zeros(2, 2)}, str(path))

    def no_session(*args, **kwargs):
        raise AssertionError("a session was opened before the weights were checked")

    monkeypatch.setattr(parity, "open_session", no_session)
    monkeypatch.setattr(parity.EagerSession, "open", no_session)
    with pytest.raises(SfedgeError, match="changed since export"):
        parity.run_parity(folder)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/x.safetensors", "link/model.safetensors"])
def test_safetensors_index_cannot_point_outside_its_folder(tmp_path, shard):
    from safetensors.torch import save_file

    from sfedge.models.weights import checkpoint_size

    save_file({"w": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "link").symlink_to(tmp_path, target_is_directory=True)
    os.link(tmp_path / "outside.safetensors", tmp_path / "model.safetensors")
    (llm / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(SfedgeError, match=r"model.safetensors.index.json: weight_map shard .* only files inside the folder"):
        checkpoint_size(str(llm))


# --- backends table, explanations, kv_dtype -----------------------------------------------------------

def test_one_backend_table_feeds_every_map():
    import importlib.util

    from sfedge.backends import BACKENDS, exportable
    from sfedge.cli import build_parser
    from sfedge.quantize.recipes import RECIPE_MODULES
    from sfedge.runtime.sessions import INSTALL_HINTS, SESSION_MODULES

    assert set(BACKENDS) == {b.value for b in Backend}
    assert SESSION_MODULES == {name: info.session_module for name, info in BACKENDS.items()}
    assert RECIPE_MODULES == {name: info.recipe_module for name, info in BACKENDS.items() if info.recipe_module}
    assert INSTALL_HINTS["executorch-coreml"] == "pip install 'sfedge[executorch,coreml]'"
    for info in BACKENDS.values():
        for module in (info.exporter_module, info.session_module, info.recipe_module):
            assert module is None or importlib.util.find_spec(module) is not None, module
    parser = build_parser()
    export = next(a for a in parser._subparsers._group_actions[0].choices["export"]._actions if a.dest == "backend")
    assert export.choices == exportable() == ["executorch", "onnx", "coreml", "executorch-coreml"]


def _pte_folder(tmp_path: Path, backend: str) -> Path:
    folder = tmp_path / backend
    folder.mkdir()
    data = b"not really a program"
    (folder / "model.pte").write_bytes(data)
    (folder / "tokenizer.json").write_bytes(TOKENIZER)
    components = [_entry(c, "model.pte", _sha(data)) for c in ("vision_encoder", "projector", "token_embedding", "text_decoder")]
    _manifest(backend, components=components).write(folder)
    return folder


def test_executorch_coreml_folder_gets_the_core_ml_delegate_explanation(tmp_path):
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime

    from sfedge.runtime.sessions import open_session

    if Runtime.get().backend_registry.is_available("CoreMLBackend"):
        pytest.skip("this ExecuTorch runtime has CoreMLBackend")
    with pytest.raises(SfedgeError, match=r"executorch-coreml program .* no CoreMLBackend .*macOS / iOS.*"
                                          r"`sfedge export --backend executorch --model tiny --frames 8 --max-context 128") as info:
        open_session(_pte_folder(tmp_path, "executorch-coreml"))
    assert "\n" not in str(info.value)


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_core_ml_refusal_suggests_the_model_flag(tmp_path):
    from sfedge.runtime.sessions.coreml import require_macos

    with pytest.raises(SfedgeError, match=r"`sfedge export --backend executorch --model tiny --frames 8 --max-context 128 ") as info:
        require_macos(_manifest("coreml"))
    assert "--preset" not in str(info.value)


def test_kv_dtype_is_read_from_what_the_exporter_produced(tiny_model):
    import copy

    from sfedge.export.common import kv_cache_dtype
    from sfedge.export.coreml_llm import use_masked_cache

    decoder = _entry("text_decoder", "llm.pte", "0" * 64)
    assert kv_cache_dtype(tiny_model, decoder, Path(".")) == "float32"  # the eager cache, as ExecuTorch keeps it
    coreml = copy.deepcopy(tiny_model)
    use_masked_cache(coreml.text_decoder)
    assert kv_cache_dtype(coreml, decoder, Path(".")) == "float16"  # Core ML states
    decoder.extra["kv_dtype"] = "int8"  # an exporter that states its own wins
    assert kv_cache_dtype(coreml, decoder, Path(".")) == "int8"


@pytest.mark.parametrize("kv_dtype, size", [("float32", 4), ("float16", 2), ("int8", 1)])
def test_the_bench_costs_the_cache_with_the_recorded_kv_dtype(tmp_path, kv_dtype, size):
    from sfedge.benchmarks.worker import artifact_info

    manifest = _manifest()
    manifest.components[3].extra["kv_dtype"] = kv_dtype
    pipeline = SimpleNamespace(session=SimpleNamespace(manifest=manifest, backend="onnx"))
    assert artifact_info(pipeline, str(_folder(tmp_path, manifest)))[2] == size


@pytest.mark.slow
def test_an_onnx_export_records_tokenizer_hash_kv_dtype_and_verifies(tiny_onnx, tmp_path, monkeypatch):
    from sfedge.runtime.sessions import open_session

    out = tmp_path / "onnx"
    shutil.copytree(tiny_onnx, out)  # a copy: this test rewrites tokenizer.json
    manifest = read_manifest(out)
    assert manifest.tokenizer["sha256"] == _sha((out / "tokenizer.json").read_bytes())
    assert manifest.component("text_decoder").extra["kv_dtype"] == "float32"
    calls = _count_hashing(monkeypatch)
    open_session(out).close()
    assert len(calls) == len({e.file for e in manifest.components}) + 1
    calls.clear()
    open_session(out).close()
    assert calls == []  # the second open hashes nothing
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text() + " ")
    with pytest.raises(SfedgeError, match="tokenizer.json does not match the sha256"):
        open_session(out)
