"""ExecuTorch session: the .pte files of an artifact folder through ``executorch.runtime``.

Reads only the manifest and the files: method names, the static encoder batch and frame count, the
prefill chunk and the KV-cache length all come from the manifest's entries (the .pte's constant
methods are checked against them on open).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from sfedge.config import ModelConfig
from sfedge.errors import SfedgeError
from sfedge.manifest import Component, Manifest, artifact_path
from sfedge.runtime.sessions.base import SESSIONS, ModelSession, SessionOptions


def _runtime():
    try:
        from executorch.runtime import Runtime
    except ModuleNotFoundError as exc:
        raise SfedgeError(f"the executorch runtime needs {exc.name}: pip install 'sfedge[executorch]'") from None
    return Runtime.get()


def _load_kernels(manifest: Manifest) -> None:
    """Kernels that live outside the core runtime: the LLM custom ops, quantized embeddings."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama.update_cache, llama.custom_sdpa)

    if any(entry.extra.get("quantized_kernels") for entry in manifest.components):
        import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed.embedding_*bit)


class ExecuTorchSession(ModelSession):
    backend = "executorch"

    def __init__(self, folder: Path, manifest: Manifest, options: SessionOptions = SessionOptions()):
        self.folder = Path(folder)
        self.manifest = manifest
        self.config = ModelConfig.from_dict(manifest.model_config)
        _load_kernels(manifest)
        if options.threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(int(options.threads))
        runtime = _runtime()
        self._programs: Dict[str, object] = {}  # file -> the first Program loaded from it
        self._more_programs: list = []  # one more Program per further method of a file (see _load)
        self._methods = {c.value: self._load(runtime, manifest.component(c)) for c in Component if c != Component.PROJECTOR}
        self._projectors = {frames: self._load(runtime, entry) for frames, entry in manifest.projectors().items()}
        vision = manifest.component(Component.VISION_ENCODER)
        decoder = manifest.component(Component.TEXT_DECODER)
        self.encoder_batch = int(vision.extra["encoder_batch"])
        self.frame_counts = tuple(self._projectors)
        self.frames = self.frame_counts[0]
        self.max_context = int(decoder.extra["max_seq_len"])
        self.max_prefill_chunk = int(decoder.extra["prefill_chunk"])
        self._check_constants(decoder)

    @classmethod
    def open(cls, folder: Path, manifest: Manifest, options: SessionOptions) -> "ExecuTorchSession":
        return cls(folder, manifest, options)

    def _load(self, runtime, entry):
        if entry.file not in self._programs:
            program = self._programs[entry.file] = runtime.load_program(str(artifact_path(self.folder, entry.file)))
        else:
            # methods loaded from one Program share its planned memory: running llm.pte's token_embedding
            # overwrote the text_decoder's KV cache (mutable buffers). A Program of its own for each method.
            program = runtime.load_program(str(artifact_path(self.folder, entry.file)))
            self._more_programs.append(program)
        if entry.method not in program.method_names:
            raise SfedgeError(f"{self.folder / entry.file} has no method {entry.method!r} (it has: "
                              f"{', '.join(sorted(program.method_names))}): the manifest and the file disagree, re-export")
        return program.load_method(entry.method)

    def constant(self, name: str):
        """A constant method of llm.pte (get_max_seq_len, get_eos_ids, ...): ints come back as int, lists as list."""
        program = self._programs[self.manifest.component(Component.TEXT_DECODER).file]
        values = list(program.load_method(name).execute([]))
        return values if name == "get_eos_ids" else values[0]

    def _check_constants(self, decoder) -> None:
        if self.constant("get_max_seq_len") != self.max_context:
            raise SfedgeError(f"{self.folder / decoder.file}: get_max_seq_len is {self.constant('get_max_seq_len')} but the "
                              f"manifest says {self.max_context}: re-export the folder")

    def _run(self, component: Component, inputs: list) -> torch.Tensor:
        return self._methods[component.value].execute(inputs)[0]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Run the static-batch encoder over pixels [N, 3, S, S], padding the last batch with zeros."""
        batch, count = self.encoder_batch, pixels.shape[0]
        pixels = pixels.float().contiguous()
        outputs = []
        for begin in range(0, count, batch):
            chunk = pixels[begin:begin + batch]
            if chunk.shape[0] < batch:
                chunk = torch.cat([chunk, chunk.new_zeros(batch - chunk.shape[0], *chunk.shape[1:])])
            outputs.append(self._run(Component.VISION_ENCODER, [chunk.contiguous()]).clone())
        return torch.cat(outputs)[:count]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        self.check_frames(features.shape[0], f"{self.folder}")
        return self._projectors[features.shape[0]].execute([features.float().contiguous()])[0].clone()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        ids = token_ids.to(torch.long).reshape(-1)
        chunk = self.max_prefill_chunk
        parts = [self._run(Component.TOKEN_EMBEDDING, [ids[b:b + chunk][None].contiguous()])[0].clone()
                 for b in range(0, ids.shape[0], chunk)]
        return torch.cat(parts)

    def decode(self, embeds: torch.Tensor, start_pos: int) -> torch.Tensor:
        length = embeds.shape[0]
        if not 1 <= length <= self.max_prefill_chunk:
            raise SfedgeError(f"decode takes 1..{self.max_prefill_chunk} tokens at once (the exported prefill chunk), got {length}")
        if start_pos < 0 or start_pos + length > self.max_context:
            raise SfedgeError(f"positions {start_pos}..{start_pos + length - 1} do not fit the KV cache of {self.max_context} "
                              f"tokens: shorten the prompt or re-export with a larger --max-context")
        logits = self._run(Component.TEXT_DECODER, [embeds.float()[None].contiguous(),
                                                    torch.tensor([start_pos], dtype=torch.long)])
        return logits[0].float().clone()

    def reset(self) -> None:
        """Nothing to clear: the KV cache lives in the method's mutable buffers and custom_sdpa attends only
        to positions < start_pos + T, all of which the current conversation has written (it starts at 0)."""


SESSIONS.add("executorch", ExecuTorchSession)
