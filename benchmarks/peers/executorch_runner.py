"""Peer ``executorch-runner``: ExecuTorch's own C++ LLM runner (``executorch.extension.llm.runner.
MultimodalRunner``) on the *same* ``llm.pte`` and ``tokenizer.json`` of an executorch artifact folder,
fed the same token ids (``make_token_input``), greedy. Its PyTorchObserver stats give the rates
(decode = generated tokens / (inference end - prompt eval end), ExecuTorch's formula). The runner
prefills the prompt in one call, so the prompt must fit the exported prefill chunk.

Generated text: the binding turns every decoded piece into a Python ``str`` (strict UTF-8) before a
token callback sees it, so a piece that ends inside a multi-byte character (frequent with random
weights and Qwen's byte-level BPE) raised UnicodeDecodeError out of ``generate``. We pass no token
callback; the runner writes each piece's raw bytes to file descriptor 1 itself, which we redirect
to a temporary file (it would otherwise mix with the worker's JSON on stdout) and decode
incrementally with errors replaced (``Utf8Pieces``)."""
from __future__ import annotations

import codecs
import contextlib
import ctypes
import json
import os
import sys
import tempfile
import time
from typing import Iterator, List

from sfedge.errors import SfedgeError, UsageError

TEXT_KEEP_CHARS = 400  # generated text kept in the result (the last repetition's), for a look


class Utf8Pieces:
    """Text from byte pieces that may cut a character anywhere: bytes of an unfinished character are
    held until the next piece completes it; invalid bytes become U+FFFD instead of raising."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: List[str] = []

    def feed(self, piece: bytes) -> str:
        text = self._decoder.decode(piece)
        self._parts.append(text)
        return text

    def finish(self) -> str:
        """All text; a character still unfinished at the end becomes U+FFFD."""
        self._parts.append(self._decoder.decode(b"", final=True))
        return "".join(self._parts)


@contextlib.contextmanager
def native_stdout_to(sink) -> Iterator[None]:
    """Point file descriptor 1 (what C code's printf writes to) at ``sink`` for the block, flushing
    both Python's and C's buffers on the way in and out."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    os.dup2(sink.fileno(), 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def decode_stream(handle, chunk_bytes: int = 4096) -> str:
    handle.seek(0)
    pieces = Utf8Pieces()
    for chunk in iter(lambda: handle.read(chunk_bytes), b""):
        pieces.feed(chunk)
    return pieces.finish()


def check_job(job: dict):
    """The runner needs an executorch folder and a prompt within one prefill call; returns (manifest, decoder entry)."""
    from sfedge.manifest import Component, read_manifest

    folder = job["source"].get("folder")
    manifest = read_manifest(folder) if folder else None
    if manifest is None or manifest.backend != "executorch":
        raise UsageError("the executorch-runner peer needs an executorch artifact folder (it runs that folder's llm.pte)")
    decoder = manifest.component(Component.TEXT_DECODER)
    if job["prompt_tokens"] > int(decoder.extra["prefill_chunk"]):
        raise UsageError(f"ExecuTorch's runner prefills in one call: --prompt-tokens must be <= the exported prefill chunk "
                         f"({decoder.extra['prefill_chunk']})")
    return manifest, decoder


def measure_executorch_runner(job: dict) -> dict:
    from importlib import metadata
    from pathlib import Path

    from sfedge.benchmarks.peers.common import add_sample, empty_samples, token_ids
    from sfedge.benchmarks.summary import summarize_all
    from sfedge.manifest import TOKENIZER_FILE
    from sfedge.runtime.stats import peak_rss_bytes

    folder = job["source"]["folder"]
    manifest, decoder = check_job(job)
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama.custom_sdpa / update_cache kernels)
        from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_token_input
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    except ModuleNotFoundError as exc:
        raise SfedgeError(f"the executorch-runner peer needs {exc.name}: pip install 'sfedge[executorch]'") from None
    if any(entry.extra.get("quantized_kernels") for entry in manifest.components):
        import executorch.kernels.quantized  # noqa: F401
    if job.get("threads"):
        _unsafe_reset_threadpool(int(job["threads"]))
    start = time.perf_counter_ns()
    runner = MultimodalRunner(str(Path(folder) / decoder.file), str(Path(folder) / TOKENIZER_FILE))
    construct_ms = (time.perf_counter_ns() - start) / 1e6
    method_load_ms = None  # the runner loads llm.pte's methods inside its first generate(), not in the constructor
    ids = [int(i) for i in token_ids(manifest.model_config["llm"]["vocab_size"], job["prompt_tokens"], job["seed"])]
    samples = empty_samples()
    text = ""
    for rep in range(job["warmup"] + job["repetitions"]):
        stats: list = []
        runner.reset()
        config = GenerationConfig(max_new_tokens=job["gen_tokens"], temperature=0.0, echo=False)
        with tempfile.TemporaryFile() as sink:
            with native_stdout_to(sink):
                runner.generate([make_token_input(ids)], config, token_callback=None,
                                stats_callback=lambda s: stats.append(json.loads(s.to_json_string())))
            text = decode_stream(sink)
        if not stats:
            raise SfedgeError("ExecuTorch's runner reported no stats")
        st = stats[-1]
        if method_load_ms is None:  # counted as load (its prompt timing starts after it), as ours counts opening llm.pte
            method_load_ms = float(st["model_load_end_ms"] - st["model_load_start_ms"])
        if st["prompt_tokens"] != job["prompt_tokens"]:
            raise SfedgeError(f"ExecuTorch's runner saw {st['prompt_tokens']} prompt tokens, expected {job['prompt_tokens']}")
        if rep >= job["warmup"]:
            add_sample(samples, st["prompt_tokens"], st["prompt_eval_end_ms"] - st["inference_start_ms"],
                       st["generated_tokens"], st["inference_end_ms"] - st["prompt_eval_end_ms"])
    return {"metrics": summarize_all(samples), "samples": samples, "peak_rss_bytes": peak_rss_bytes(),
            "name": f"ExecuTorch {metadata.version('executorch')} runner", "model_load_ms": construct_ms + (method_load_ms or 0.0),
            "threads": job.get("threads"),
            "notes": [f"load = constructor {construct_ms:,.0f} ms + llm.pte's methods {method_load_ms or 0.0:,.0f} ms "
                      f"(loaded inside the first generate(), outside its prompt timing)"], "generated_text": text.strip()[:TEXT_KEEP_CHARS]}
