"""ExecuTorch session: the .pte files of an artifact folder through ``executorch.runtime``.

Reads only the manifest and the files: method names, the static encoder batch and frame count, the
prefill chunk and the KV-cache length all come from the manifest's entries (the .pte's constant
methods are checked against them on open).
"""
from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Dict

import torch

from sfedge.config import ModelConfig
from sfedge.errors import SfedgeError
from sfedge.manifest import Component, Manifest, artifact_path
from sfedge.runtime.sessions.base import SESSIONS, ModelSession, SessionOptions

# The compiled kernel libraries the .pte files may need, relative to the executorch package. Loading
# them with torch.ops.load_library registers their ExecuTorch kernels (and their PyTorch ops) without
# importing the Python modules that wrap them: executorch.extension.llm.custom_ops.custom_ops pulls in
# torch._inductor and executorch.runtime pulls in executorch.exir (together ~20 s of a 12.7 s cold start
# on a busy 2-core machine; torch alone is the rest). See docs/executorch.md, "Cold start".
KERNEL_LIBRARIES = {"custom_ops": "extension/llm/custom_ops/libcustom_ops_aot_lib.so",
                    "quantized": "kernels/quantized/libquantized_ops_aot_lib.so"}
_loaded_libraries: set = set()


def _executorch_root() -> Path:
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise SfedgeError("the executorch runtime needs executorch: pip install 'sfedge[executorch]'")
    return Path(list(spec.submodule_search_locations)[0])


def _pybindings():
    """ExecuTorch's compiled Python module (what executorch.runtime wraps), imported without executorch.exir."""
    try:
        from executorch.extension.pybindings import _C
    except ModuleNotFoundError as exc:
        raise SfedgeError(f"the executorch runtime needs {exc.name}: pip install 'sfedge[executorch]'") from None
    return _C


def _load_library(name: str) -> None:
    if name in _loaded_libraries:
        return
    path = _executorch_root() / KERNEL_LIBRARIES[name]
    if path.is_file():
        torch.ops.load_library(str(path))
    elif name == "custom_ops":  # another wheel layout: the Python module finds its library itself
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    else:
        import executorch.kernels.quantized  # noqa: F401
    _loaded_libraries.add(name)


class _Program:
    """One loaded .pte: its method names, and each method loaded once, on first use."""

    def __init__(self, program, path: str):
        self._program = program
        self.path = path
        self.method_names = {program.get_method_name(i) for i in range(program.num_methods())}
        self._methods: Dict[str, object] = {}

    def load_method(self, name: str):
        if name not in self._methods:
            try:
                self._methods[name] = self._program.load_method(name)
            except RuntimeError as exc:  # a damaged delegate blob or kernel table: the runtime's own error code
                raise SfedgeError(f"{self.path}: ExecuTorch could not load method {name!r} ({_first_line(exc)}): the file "
                                  f"is damaged or from another ExecuTorch version; re-export it (or drop --no-verify)") from None
        return self._methods[name]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Runtime:
    def __init__(self, pybindings):
        self._pybindings = pybindings

    def load_program(self, path: str) -> _Program:
        try:
            program = self._pybindings._load_program(path, enable_etdump=False, debug_buffer_size=0,
                                                     program_verification=self._pybindings.Verification.InternalConsistency)
        except RuntimeError as exc:  # truncated / corrupted flatbuffer: "Failed to load program, error: 0x..."
            raise SfedgeError(f"{path} is not a loadable ExecuTorch program ({_first_line(exc)}): the file is truncated or "
                              f"damaged; re-export it (or drop --no-verify to have its sha256 checked)") from None
        return _Program(program, path)


def _runtime() -> _Runtime:
    return _Runtime(_pybindings())


def _load_kernels(manifest: Manifest) -> None:
    """Kernels that live outside the core runtime: the LLM custom ops, quantized embeddings."""
    _load_library("custom_ops")  # llama.update_cache, llama.custom_sdpa
    if any(entry.extra.get("quantized_kernels") for entry in manifest.components):
        _load_library("quantized")  # quantized_decomposed.embedding_*bit
    if any(entry.extra.get("sfedge_kernels") for entry in manifest.components):
        from sfedge.export.executorch_kernels import load_kernels  # sfedge::decode_attention (built once, cached)

        load_kernels()


@contextlib.contextmanager
def serial_blas():
    """MKL single-threaded while a method runs.

    ExecuTorch's custom_sdpa (and its optimized portable kernels) call ``sgemm_``, which in this
    process is PyTorch's MKL with GNU OpenMP. They call it from ExecuTorch's own thread pool, so every
    pool thread opens an OpenMP team of torch.get_num_threads() threads: 2 x 2 threads on 2 cores, which
    halves custom_sdpa's speed on a quiet machine and costs 10-100x on a busy one (sdpa_probe
    --blas-threads). XNNPACK does not use MKL; PyTorch's own thread count is restored afterwards."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ExecuTorchSession(ModelSession):
    backend = "executorch"

    def __init__(self, folder: Path, manifest: Manifest, options: SessionOptions = SessionOptions()):
        self.folder = Path(folder)
        self.manifest = manifest
        self.config = ModelConfig.from_dict(manifest.model_config)
        for entry in manifest.components:  # files load on first use: refuse escaping paths now, verified or not
            artifact_path(self.folder, entry.file)
        _load_kernels(manifest)
        if options.threads:
            _pybindings()._unsafe_reset_threadpool(int(options.threads))
        self._runtime = _runtime()
        self._programs: Dict[tuple, object] = {}  # (file, method) -> its own Program (see _load)
        # Components load on first use (a text-only chat never loads the vision encoder).
        self._entries = {c.value: manifest.component(c) for c in Component if c != Component.PROJECTOR}
        self._methods: Dict[str, object] = {}
        self._projector_entries = manifest.projectors()
        self._projectors: Dict[int, object] = {}
        vision = manifest.component(Component.VISION_ENCODER)
        decoder = manifest.component(Component.TEXT_DECODER)
        self.encoder_batch = int(vision.extra["encoder_batch"])
        self.frame_counts = tuple(self._projector_entries)
        self.frames = self.frame_counts[0]
        self.max_context = int(decoder.extra["max_seq_len"])
        self.max_prefill_chunk = int(decoder.extra["prefill_chunk"])
        # Recipes with attention "switch" (and "sfedge" folders exported before 2026-11-30 13:30): a T = 1 method
        # (gqa-masked / sfedge's decode kernel) over the same KV cache, used from a position on where it is the
        # faster of the two (export/executorch_llm.py). Loaded on first use: it re-packs the XNNPACK weights.
        self._flat_method = decoder.extra.get("decode_method")
        self._flat_from = int(decoder.extra.get("decode_method_from_position", self.max_context))
        self._check_constants(decoder)

    @classmethod
    def open(cls, folder: Path, manifest: Manifest, options: SessionOptions) -> "ExecuTorchSession":
        return cls(folder, manifest, options)

    def load_for_video(self, frames: int) -> None:
        """The vision encoder, the projector of ``frames`` and the token embedding (the decoder loaded at open):
        each method's XNNPACK weights are packed at its load, ~2 s for the 1B's vision encoder."""
        self.check_frames(frames, f"{self.folder}")
        self._method(Component.VISION_ENCODER)
        self._projector(frames)
        self._method(Component.TOKEN_EMBEDDING)

    def _method(self, component: Component):
        if component.value not in self._methods:
            self._methods[component.value] = self._load(self._runtime, self._entries[component.value])
        return self._methods[component.value]

    def _projector(self, frames: int):
        if frames not in self._projectors:
            self._projectors[frames] = self._load(self._runtime, self._projector_entries[frames])
        return self._projectors[frames]

    def _load(self, runtime, entry):
        """A Program of its own for each component's method: methods loaded from one Program share its
        planned memory, and running llm.pte's token_embedding overwrote the text_decoder's KV cache
        (mutable buffers). Methods that must share the decoder's cache (the flat decode method) and the
        constant methods are loaded from the decoder's Program (``_decoder_program``)."""
        key = (entry.file, entry.method)
        if key not in self._programs:
            self._programs[key] = runtime.load_program(str(artifact_path(self.folder, entry.file)))
        program = self._programs[key]
        if entry.method not in program.method_names:
            raise SfedgeError(f"{self.folder / entry.file} has no method {entry.method!r} (it has: "
                              f"{', '.join(sorted(program.method_names))}): the manifest and the file disagree, re-export")
        return program.load_method(entry.method)

    def _decoder_program(self):
        self._method(Component.TEXT_DECODER)  # loads llm.pte (and the decoder: the LLM is always needed)
        entry = self._entries[Component.TEXT_DECODER.value]
        return self._programs[(entry.file, entry.method)]

    def constant(self, name: str):
        """A constant method of llm.pte (get_max_seq_len, get_eos_ids, ...): ints come back as int, lists as list."""
        values = list(self._decoder_program().load_method(name)([]))
        return values if name == "get_eos_ids" else values[0]

    def _check_constants(self, decoder) -> None:
        if self.constant("get_max_seq_len") != self.max_context:
            raise SfedgeError(f"{self.folder / decoder.file}: get_max_seq_len is {self.constant('get_max_seq_len')} but the "
                              f"manifest says {self.max_context}: re-export the folder")

    def _run(self, component: Component, inputs: list) -> torch.Tensor:
        with serial_blas():
            return self._method(component)(inputs)[0]

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
        with serial_blas():
            return self._projector(features.shape[0])([features.float().contiguous()])[0].clone()

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
        inputs = [embeds.float()[None].contiguous(), torch.tensor([start_pos], dtype=torch.long)]
        if self._flat_method and length == 1 and start_pos >= self._flat_from:
            with serial_blas():
                logits = self._flat_decoder()(inputs)[0]
        else:
            logits = self._run(Component.TEXT_DECODER, inputs)
        return logits[0].float().clone()

    def _flat_decoder(self):
        program = self._decoder_program()
        if self._flat_method not in program.method_names:
            raise SfedgeError(f"{self.folder}: llm.pte has no method {self._flat_method!r} that the manifest names: re-export")
        return program.load_method(self._flat_method)

    def reset(self) -> None:
        """Nothing to clear: the KV cache lives in the method's mutable buffers and custom_sdpa attends only
        to positions < start_pos + T, all of which the current conversation has written (it starts at 0)."""


SESSIONS.add("executorch", ExecuTorchSession)
