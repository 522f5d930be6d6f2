"""The one table of backends: which module exports, runs and holds the recipes of each, and how to install it.

export/api.py (exporters), runtime/sessions/__init__.py (sessions, install hints) and
quantize/recipes.py (recipes) all read this table; a new backend is one row here plus its modules.
Modules are named, not imported: a backend's optional dependencies load only when it is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class BackendInfo:
    name: str  # the manifest's ``backend`` and ``--backend``
    exporter_module: Optional[str]  # registers an exporter in sfedge.export.api.EXPORTERS (None: nothing to export)
    session_module: str  # registers a session in sfedge.runtime.sessions.base.SESSIONS
    recipe_module: Optional[str]  # registers recipes in sfedge.quantize.recipes.RECIPES (None: built in)
    extra: Optional[str]  # the pip extra holding its dependencies (None: core install)
    runs_on_linux: str  # what of it works on Linux

    @property
    def install_hint(self) -> str:
        return f"pip install 'sfedge[{self.extra}]'" if self.extra else "pip install sfedge"


BACKENDS: Dict[str, BackendInfo] = {
    info.name: info
    for info in (
        BackendInfo("eager", None, "sfedge.runtime.sessions.eager", None, None,
                    "everything: the PyTorch reference of parity"),
        BackendInfo("executorch", "sfedge.export.executorch", "sfedge.runtime.sessions.executorch",
                    "sfedge.quantize.executorch", "executorch", "export and run (XNNPACK)"),
        BackendInfo("onnx", "sfedge.export.onnx", "sfedge.runtime.sessions.onnxruntime",
                    "sfedge.quantize.onnx", "onnx", "export and run (ONNX Runtime)"),
        BackendInfo("coreml", "sfedge.export.coreml", "sfedge.runtime.sessions.coreml",
                    "sfedge.quantize.coreml", "coreml", "export and inspect; prediction needs macOS 15+"),
        BackendInfo("executorch-coreml", "sfedge.export.executorch_coreml", "sfedge.runtime.sessions.executorch_coreml",
                    "sfedge.quantize.coreml", "executorch,coreml",
                    "export and inspect; running needs an ExecuTorch runtime with CoreMLBackend (macOS / iOS)"),
    )
}


def exportable() -> list[str]:
    """Backends ``sfedge export --backend`` accepts, in table order."""
    return [name for name, info in BACKENDS.items() if info.exporter_module]
