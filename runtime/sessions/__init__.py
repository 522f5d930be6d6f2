"""open_session(): read an artifact folder's manifest, verify its files, open the right backend.

Backends register themselves in SESSIONS when their module is imported; only the module of the
backend asked for is imported, so optional dependencies stay optional.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from sfedge.backends import BACKENDS
from sfedge.errors import SfedgeError
from sfedge.manifest import read_manifest, verify_artifacts
from sfedge.runtime.sessions.base import SESSIONS, ModelSession, SessionOptions

SESSION_MODULES = {name: info.session_module for name, info in BACKENDS.items()}
INSTALL_HINTS = {name: info.install_hint for name, info in BACKENDS.items() if info.extra}


def session_class(backend: str) -> type:
    module = SESSION_MODULES.get(backend)
    if module is None:
        raise SfedgeError(f"unknown runtime backend {backend!r}; known: {', '.join(SESSION_MODULES)}")
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise SfedgeError(f"the {backend} runtime needs {exc.name}, which is not installed: {INSTALL_HINTS.get(backend, '')}") from None
    return SESSIONS.get(backend)


def open_session(folder: str | Path, options: SessionOptions = SessionOptions(), backend: str | None = None) -> ModelSession:
    """Open an artifact folder with the backend its manifest names (or ``backend``, e.g. eager)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if options.verify and (backend or manifest.backend) != "eager":
        verify_artifacts(folder, manifest)
    return session_class(backend or manifest.backend).open(folder, manifest, options)


__all__ = ["ModelSession", "SessionOptions", "open_session", "session_class", "SESSIONS"]
