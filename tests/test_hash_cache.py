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
    replacement.write_bytes(FILES["projector.onnx"])
    replacement.rename(folder / "projector.onnx")  # a new inode
    verify_artifacts(folder, read_manifest(folder))
    assert calls == ["projector.onnx"]


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
