"""The verification cache (sfedge/hash_cache.py): a verified file is not hashed again until its size, mtime,
ctime or inode changes; a mismatch is never cached; a corrupt or unwritable cache is not an error."""
from __future__ import annotations

import json
import os

import pytest

from sfedge import hash_cache
from sfedge.errors import SfedgeError
from sfedge.manifest import read_manifest, verify_artifacts

from artifact_folders import FILES, _count_hashing, _folder, _own_cache  # noqa: F401 (_own_cache: autouse fixture)


def test_a_second_verification_hashes_nothing(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    calls = _count_hashing(monkeypatch)
    verify_artifacts(folder, read_manifest(folder))
    assert sorted(calls) == sorted([*FILES, "tokenizer.json"])
    calls.clear()
    verify_artifacts(folder, read_manifest(folder))
    assert calls == []
    verify_artifacts(folder, read_manifest(folder), use_cache=False)
    assert len(calls) == len(FILES) + 1


def test_a_touched_file_is_rehashed_and_a_flipped_byte_is_caught(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    calls = _count_hashing(monkeypatch)
    verify_artifacts(folder, read_manifest(folder))
    calls.clear()
    target = folder / "decoder_model_merged.onnx_data"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    verify_artifacts(folder, read_manifest(folder))
    assert calls == ["decoder_model_merged.onnx_data"]
    # same size, mtime put back: ctime still changes, so the flip is hashed and caught
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[10] ^= 0x01
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(SfedgeError, match="onnx_data does not match the sha256"):
        verify_artifacts(folder, read_manifest(folder))
    with pytest.raises(SfedgeError, match="does not match"):  # a mismatch is never cached
        verify_artifacts(folder, read_manifest(folder))


def test_a_replaced_file_with_the_same_bytes_count_is_rehashed(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    verify_artifacts(folder, read_manifest(folder))
    calls = _count_hashing(monkeypatch)
    replacement = folder / "new"
    replacement.write_bytes(FILES["decoder_model_merged.onnx_data"])
    replacement.rename(folder / "decoder_model_merged.onnx_data")  # a new inode
    verify_artifacts(folder, read_manifest(folder))
    assert calls == ["decoder_model_merged.onnx_data"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"version": 1, "entries": []}', b"\xff\xfe"])
def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path, content):
    folder = _folder(tmp_path)
    cache = hash_cache.cache_file()
    cache.parent.mkdir(parents=True)
    cache.write_bytes(content)
    verify_artifacts(folder, read_manifest(folder))
    data = json.loads(cache.read_text())
    assert data["version"] == hash_cache.VERSION and len(data["entries"]) == len(FILES) + 1


def test_an_unwritable_cache_is_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv(hash_cache.CACHE_DIR_ENV, str(blocker / "cache"))  # its parent is a file
    folder = _folder(tmp_path)
    verify_artifacts(folder, read_manifest(folder))
    verify_artifacts(folder, read_manifest(folder))


def test_a_small_file_rewritten_with_the_same_bytes_keeps_its_verdict(tmp_path, monkeypatch):
    """A file of at most 64 KiB is signed by content: coremltools rewrites a package's Manifest.json, byte for byte the
    same, each time it opens the package; that must not send the next start back to hashing the whole package."""
    folder = _folder(tmp_path)
    verify_artifacts(folder, read_manifest(folder))
    calls = _count_hashing(monkeypatch)
    replacement = folder / "new"
    replacement.write_bytes(FILES["projector.onnx"])
    replacement.rename(folder / "projector.onnx")  # a new inode, mtime and ctime; the same bytes
    verify_artifacts(folder, read_manifest(folder))
    assert calls == []
    (folder / "projector.onnx").write_bytes(FILES["projector.onnx"][:-1] + b"X")  # same size, other bytes
    with pytest.raises(SfedgeError, match="projector.onnx does not match the sha256"):
        verify_artifacts(folder, read_manifest(folder))


def _package(tmp_path):
    package = tmp_path / "model.mlpackage"
    (package / "Data/com.apple.CoreML/weights").mkdir(parents=True)
    (package / "Manifest.json").write_text('{"rootModelIdentifier": "a"}')
    (package / "Data/com.apple.CoreML/model.mlmodel").write_bytes(b"spec" * 10)
    (package / "Data/com.apple.CoreML/weights/weight.bin").write_bytes(b"w" * 100_000)
    return package


def test_a_package_hash_leaves_out_coremltools_manifest_rewrites_in_flight(tmp_path):
    from sfedge.manifest import path_bytes, sha256_path

    package = _package(tmp_path)
    digest, size, signature = sha256_path(package), path_bytes(package), hash_cache.signature(package)
    (package / "Manifest.465ff93f-3af1-46cd-a2ff-b17e388ce0cb").write_text('{"rootModelIdentifier": "a"}')
    assert (sha256_path(package), path_bytes(package), hash_cache.signature(package)) == (digest, size, signature)
    (package / "Data/com.apple.CoreML/Manifest.other").write_text("x")  # only the package root's temp is transient
    assert sha256_path(package) != digest


def test_a_file_gone_between_listing_and_reading_changes_the_signature(tmp_path, monkeypatch):
    import sfedge.hash_cache as module

    package = _package(tmp_path)
    before = hash_cache.signature(package)
    listed = module.artifact_files(package)
    (package / "Data/com.apple.CoreML/model.mlmodel").unlink()
    monkeypatch.setattr(module, "artifact_files", lambda path: listed)
    assert hash_cache.signature(package) != before  # no traceback, and never equal to a signature taken before
