"""The files an artifact is made of: the file itself, or every file inside a folder artifact (.mlpackage).

One listing for hashing (``sfedge.manifest.sha256_path``), sizing (``path_bytes``) and the verification
cache's stat signature (``sfedge.hash_cache.signature``), so the three always agree on what an artifact is.

Left out: coremltools' in-flight manifest rewrites. Opening a package with coremltools (``MLModel(path)``,
``coremltools.utils.load_spec``; on macOS every Core ML session does) rewrites ``Manifest.json`` through a temp
file ``Manifest.<id>`` beside it, renamed over it a moment later. Another process hashing the package in that
moment would otherwise see a file that is gone when it is read, or a hash with an extra file in it.
A file that disappears between the listing and its use is skipped the same way.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List, Tuple, Union

PACKAGE_MANIFEST = "Manifest.json"


def artifact_files(path: Union[str, Path]) -> List[Tuple[str, Path]]:
    """[(name relative to ``path``, file)] sorted by name: ``[("", path)]`` for a file."""
    path = Path(path)
    if path.is_file():
        return [("", path)]
    package = (path / PACKAGE_MANIFEST).is_file()

    def transient(file: Path) -> bool:  # Manifest.<id> beside a package's Manifest.json
        return package and file.parent == path and file.name != PACKAGE_MANIFEST and file.name.startswith("Manifest.")

    files = (p for p in path.rglob("*") if p.is_file() and not transient(p))
    return sorted((str(p.relative_to(path)), p) for p in files)


def sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
