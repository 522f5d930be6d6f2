"""The verification cache: an artifact file verified once is not hashed again while it is unchanged.

``verify_artifacts`` asks ``verified(path, expected_sha256, hasher)``. A verdict is remembered only
when the hash matched, keyed by the file's absolute path and the expected sha256, together with its
stat signature: size, mtime_ns, ctime_ns, inode and device of the file (of every file inside a
.mlpackage folder). Any change of the signature (a rewrite, ``touch``, a copy, a replacement by
rename) makes the next open hash the file again; a mismatch is never cached. A file of at most 64 KiB is
signed by its content instead (hashing it costs less than a stat's worth of doubt): a Core ML package's
``Manifest.json``, which coremltools rewrites, byte for byte the same, every time it opens the package (on
macOS every session does), would otherwise send every start back to hashing the whole package.

The cache is a small JSON file, ``$SFEDGE_CACHE_DIR/verified.json`` or
``~/.cache/sfedge/verified.json`` (``$XDG_CACHE_HOME`` is honoured), written atomically (temp file +
rename). A missing, corrupt or unwritable cache is ignored (and rewritten when possible), never an
error. ``SFEDGE_VERIFY_CACHE=0`` turns it off (every open hashes every file).

Accepted limit: a file rewritten in place with the same size, whose mtime AND ctime are both
restored afterwards, keeps its cached verdict. Restoring ctime needs a change of the system clock or
raw access to the block device (root); anyone who can do that can also rewrite the manifest. Turn
the cache off (or delete the cache file) when that is in your threat model. The cache file is as
trusted as the user's home: whoever can write it can record a verdict for any file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Union

from sfedge.artifact_files import artifact_files, sha256_file

CACHE_DIR_ENV = "SFEDGE_CACHE_DIR"
ENABLE_ENV = "SFEDGE_VERIFY_CACHE"  # "0" turns the cache off
FILE_NAME = "verified.json"
VERSION = 2  # 2: small files signed by content
SMALL_FILE_BYTES = 64 * 1024
MAX_ENTRIES = 2048


def cache_file() -> Path:
    base = os.environ.get(CACHE_DIR_ENV)
    if base:
        return Path(base) / FILE_NAME
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sfedge" / FILE_NAME


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") != "0"


def signature(path: Union[str, Path]) -> List[list]:
    """[relative name, size, mtime_ns, ctime_ns, inode, device] of the file, or of every file in a folder
    (``sfedge.artifact_files``); a file of at most SMALL_FILE_BYTES is signed [name, size, sha256] instead."""
    rows = []
    for name, file in artifact_files(path):
        try:
            stat = file.stat()
            if stat.st_size <= SMALL_FILE_BYTES:
                rows.append([name, stat.st_size, sha256_file(file)])
            else:
                rows.append([name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev])
        except FileNotFoundError:  # gone since the listing: the signature then differs from the next one
            rows.append([name, None])
    return rows


def _load(file: Path) -> Dict[str, dict]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return {key: value for key, value in data["entries"].items() if isinstance(value, dict)}


def _save(file: Path, entries: Dict[str, dict]) -> None:
    kept = {key: value for key, value in entries.items() if os.path.exists(key)}
    kept = dict(list(kept.items())[-MAX_ENTRIES:])
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verified-", suffix=".tmp", dir=file.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump({"version": VERSION, "entries": kept}, handle)
        os.replace(tmp, file)
        tmp = None
    except OSError:
        pass  # a read-only home or cache dir: verification still works, it just hashes every time
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def verified(path: Union[str, Path], expected: str, hasher: Callable[[Path], str], use_cache: bool = True) -> bool:
    """True when ``hasher(path) == expected``, hashing only when no cached verdict matches the file as it is now."""
    path = Path(path)
    if not (use_cache and enabled()):
        return hasher(path) == expected
    key = str(path.resolve())
    before = signature(path)
    file = cache_file()
    entries = _load(file)
    record = entries.get(key)
    if record is not None and record.get("sha256") == expected and record.get("signature") == before:
        return True
    matches = hasher(path) == expected
    entries.pop(key, None)
    if matches and signature(path) == before:  # unchanged while it was hashed
        entries[key] = {"sha256": expected, "signature": before}
    if matches or record is not None:
        _save(file, entries)
    return matches
