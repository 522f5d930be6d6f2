"""Session for ``--backend executorch-coreml``: one ``model.pte`` whose four methods are Core ML delegates.

Only ExecuTorch runtimes built with the Core ML delegate (macOS / iOS) register ``CoreMLBackend``;
the Linux executorch wheel does not, and cannot load the program ("Backend CoreMLBackend is not
registered"). ``open`` checks the runtime's backend registry first and, when CoreMLBackend is
missing, raises a one-line SfedgeError that says so and how to export the same model for this
machine. Where it is registered, the program runs through the ExecuTorch session: the methods have
ExecuTorch's multimodal names and signatures; the static encoder batch and the KV-cache length come
from the manifest's tensor specs and export options (the program has no constant methods).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from sfedge.errors import SfedgeError
from sfedge.manifest import Component, Manifest
from sfedge.runtime.sessions.base import SESSIONS, SessionOptions
from sfedge.runtime.sessions.coreml import alternative_export
from sfedge.runtime.sessions.executorch import ExecuTorchSession

COREML_BACKEND_ID = "CoreMLBackend"


def require_coreml_delegate(folder: Path, manifest: Manifest) -> None:
    """Raise the one-line explanation when this ExecuTorch runtime cannot run Core ML delegates."""
    try:
        from executorch.runtime import Runtime  # the full runtime API (its backend registry); this path is rare
    except ModuleNotFoundError as exc:
        raise SfedgeError(f"the executorch runtime needs {exc.name}: pip install 'sfedge[executorch]'") from None
    registry = Runtime.get().backend_registry
    if not registry.is_available(COREML_BACKEND_ID):
        have = ", ".join(registry.registered_backend_names) or "none"
        raise SfedgeError(f"{folder} holds an executorch-coreml program (every method is a Core ML delegate), and this "
                          f"ExecuTorch runtime has no {COREML_BACKEND_ID} (it has: {have}; only the macOS / iOS builds "
                          f"register it): to run this model here export it for another backend: `{alternative_export(manifest)}`")


def _with_session_fields(manifest: Manifest) -> Manifest:
    """The fields the ExecuTorch session reads, filled from the specs the executorch-coreml exporter writes."""
    extra = {Component.VISION_ENCODER.value: lambda e: {"encoder_batch": int(e.inputs[0].shape[0])},
             Component.TEXT_DECODER.value: lambda e: {"max_seq_len": int(manifest.export_options["max_context"])}}
    components = [dataclasses.replace(e, extra={**extra[e.component](e), **e.extra}) if e.component in extra else e
                  for e in manifest.components]
    return dataclasses.replace(manifest, components=components)


class ExecuTorchCoreMLSession(ExecuTorchSession):
    backend = "executorch-coreml"

    def __init__(self, folder: Path, manifest: Manifest, options: SessionOptions = SessionOptions()):
        super().__init__(folder, _with_session_fields(manifest), options)

    @classmethod
    def open(cls, folder: Path, manifest: Manifest, options: SessionOptions) -> "ExecuTorchCoreMLSession":
        require_coreml_delegate(Path(folder), manifest)
        return cls(folder, manifest, options)

    def _check_constants(self, decoder) -> None:
        """The program has no constant methods (get_max_seq_len, ...): the manifest is the only source."""


SESSIONS.add("executorch-coreml", ExecuTorchCoreMLSession)
