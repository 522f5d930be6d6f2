"""Peer ``llama.cpp`` (through llama-cpp-python, the optional ``[llamacpp]`` extra): a GGUF of the same
LLM shape with the same seeded random weights (benchmarks/gguf_writer.py, F32), quantized by llama.cpp's
own quantizer (``llama_model_quantize``: Q4_0, Q8_0, ... with llama.cpp's default tensor-type mix),
then timed on the same token ids with the same thread count: prefill in ``n_batch`` chunks
(``llama_batch_get_one``, logits of the last position), greedy decode one token at a time.

The GGUFs are cached per LLM shape and seed (``--gguf-dir``, default ~/.cache/sfedge/gguf). Every
llama.cpp call runs in a worker process: a build made with ``-DGGML_NATIVE=ON`` on a host whose CPU
advertises AMX can die with SIGILL in a VM that does not allow AMX; that is reported with the
CMAKE_ARGS to rebuild with (``safe_cmake_args``), instead of a dead worker."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterable, List

from sfedge.errors import SfedgeError, UsageError

PINNED_VERSION = "0.3.36"  # setup.cfg [llamacpp]
QUANT_TYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "F16": "LLAMA_FTYPE_MOSTLY_F16",
               "F32": None}  # F32: the written file itself
DEFAULT_BATCH = 512  # llama.cpp's default n_batch / n_ubatch (llama-bench's too)
# /proc/cpuinfo flag -> ggml CMake option; AMX is left off (a VM may forbid it even where cpuinfo lists it)
CMAKE_FLAG_OPTIONS = (("avx", "GGML_AVX"), ("avx2", "GGML_AVX2"), ("fma", "GGML_FMA"), ("f16c", "GGML_F16C"),
                      ("bmi2", "GGML_BMI2"), ("avx_vnni", "GGML_AVX_VNNI"), ("avx512f", "GGML_AVX512"),
                      ("avx512_vnni", "GGML_AVX512_VNNI"), ("avx512vbmi", "GGML_AVX512_VBMI"),
                      ("avx512_bf16", "GGML_AVX512_BF16"))


def safe_cmake_args(flags: Iterable[str]) -> str:
    """CMAKE_ARGS for a portable llama.cpp build that uses this CPU's SIMD but never AMX."""
    flags = set(flags)
    options = ["-DGGML_NATIVE=OFF"] + [f"-D{option}=ON" for flag, option in CMAKE_FLAG_OPTIONS if flag in flags]
    return " ".join(options + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])


def sigill_message(flags: Iterable[str]) -> str:
    return ("llama.cpp build uses instructions this CPU/VM forbids (SIGILL): rebuild with "
            f"CMAKE_ARGS=\"{safe_cmake_args(flags)}\" pip install --force-reinstall --no-cache-dir "
            f"--no-binary llama-cpp-python llama-cpp-python=={PINNED_VERSION}")


def check_worker_result(result: dict, what: str) -> dict:
    """A failed llama.cpp worker: SIGILL gets the rebuild hint, anything else its note."""
    from sfedge.benchmarks.provenance import cpu_flags

    if result.get("status") != "failed":
        return result
    if result.get("returncode") == -signal.SIGILL:
        raise SfedgeError(sigill_message(cpu_flags()))
    raise SfedgeError(f"{what}: {result.get('note')}")


def _llama_cpp():
    try:
        import llama_cpp
    except ModuleNotFoundError:
        raise SfedgeError("the llama.cpp peer needs llama-cpp-python (builds from source, minutes): "
                          "pip install 'sfedge[llamacpp]' (see docs/benchmarks.md for CMAKE_ARGS)") from None
    return llama_cpp


def _quiet_logs(llama_cpp) -> None:
    """Drop llama.cpp's info logs (hundreds of lines per load); keep warnings and errors on stderr."""
    import sys

    def forward(level, text, user_data):
        if level >= 3 and text:  # GGML_LOG_LEVEL_WARN, _ERROR
            sys.stderr.write(text.decode("utf-8", "replace"))

    _quiet_logs.callback = llama_cpp.llama_log_callback(forward)  # keep a reference: llama.cpp calls it later
    llama_cpp.llama_log_set(_quiet_logs.callback, ctypes.c_void_p(0))


# --- the GGUF files: write once per shape + seed, quantize once per type -------------------------------

def default_gguf_root() -> Path:
    return Path(os.environ.get("SFEDGE_CACHE", Path.home() / ".cache" / "sfedge")) / "gguf"


def gguf_folder(root: str, llm, seed: int) -> Path:
    from sfedge.benchmarks.gguf_writer import WRITER_VERSION

    key = hashlib.sha256(json.dumps({"llm": asdict(llm), "seed": seed, "writer": WRITER_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:12]
    return Path(root) / f"qwen2-{llm.layers}x{llm.hidden}-v{llm.vocab_size}-seed{seed}-{key}"


def tensor_types(path: Path) -> Dict[str, int]:
    """GGML type -> tensor count of a GGUF (Q4_0 files keep norms F32 and, by llama.cpp's default mix,
    put the tied embedding / LM head in Q6_K or Q8_0)."""
    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


def quantize(src: Path, dst: Path, quant: str, threads: int) -> None:
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    params.nthread = threads
    partial = dst.with_name(dst.name + ".partial")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        partial.unlink(missing_ok=True)
        raise SfedgeError(f"llama.cpp could not quantize {src} to {quant}")
    os.replace(partial, dst)


def prepare_gguf(job: dict) -> dict:
    """Worker job ``llama.cpp-gguf``: the GGUF of each requested type, written/quantized when missing."""
    from sfedge.benchmarks.gguf_writer import write_gguf
    from sfedge.benchmarks.peers.common import config_of, weights_seed

    config, seed = config_of(job), weights_seed(job)
    folder = gguf_folder(job["gguf_dir"], config.llm, seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = {quant: folder / f"{quant}.gguf" for quant in job["quants"]}
    f32 = folder / "F32.gguf"
    timings: Dict[str, float] = {}
    missing = [quant for quant, path in files.items() if not path.exists()]
    if missing and not f32.exists():
        start = time.perf_counter()
        write_gguf(str(f32), config.llm, seed, name=f"sfedge {config.name} seed {seed}")
        timings["write_f32_s"] = time.perf_counter() - start
    if any(QUANT_TYPES[quant] for quant in missing):
        _quiet_logs(_llama_cpp())
    for quant in missing:
        if QUANT_TYPES[quant]:
            start = time.perf_counter()
            quantize(f32, files[quant], quant, int(job.get("threads") or os.cpu_count() or 1))
            timings[f"quantize_{quant}_s"] = time.perf_counter() - start
    if "F32" not in files and f32.exists():
        f32.unlink()  # the 1B's is 6 GB; rewritten in ~1 min when another type is asked for
    return {"files": {quant: {"path": str(path), "bytes": path.stat().st_size, "tensor_types": tensor_types(path)}
                      for quant, path in files.items()}, "timings": timings, "folder": str(folder)}


# --- timing ------------------------------------------------------------------------------------------

def measure_llamacpp(job: dict) -> dict:
    """Worker job ``llama.cpp``: load ``job["gguf"]``, prefill + decode like every other side."""
    import numpy as np

    from sfedge.benchmarks.peers.common import config_of, measure, token_ids

    llama_cpp = _llama_cpp()
    _quiet_logs(llama_cpp)
    llama_cpp.llama_backend_init()
    threads = int(job.get("threads") or os.cpu_count() or 1)
    batch = int(job.get("batch") or DEFAULT_BATCH)
    prompt, gen = job["prompt_tokens"], job["gen_tokens"]
    start = time.perf_counter_ns()
    model = llama_cpp.llama_model_load_from_file(job["gguf"].encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise SfedgeError(f"llama.cpp could not load {job['gguf']}")
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = prompt + gen + 16
    params.n_batch = params.n_ubatch = batch
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise SfedgeError(f"llama.cpp could not create a context of {params.n_ctx} tokens")
    load_ms = (time.perf_counter_ns() - start) / 1e6
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    if n_vocab != config_of(job).llm.vocab_size:
        raise SfedgeError(f"{job['gguf']} has {n_vocab} tokens, the model {config_of(job).llm.vocab_size}")
    ids = [int(i) for i in token_ids(n_vocab, prompt, job["seed"])]
    chunks = [(llama_cpp.llama_token * len(part))(*part) for part in (ids[i:i + batch] for i in range(0, prompt, batch))]
    memory = llama_cpp.llama_get_memory(ctx)
    one = (llama_cpp.llama_token * 1)()

    def decode(tokens, count: int):
        code = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, count))
        if code != 0:
            raise SfedgeError(f"llama_decode returned {code}")
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))

    def prefill_fn():
        llama_cpp.llama_memory_clear(memory, True)
        for chunk in chunks:
            logits = decode(chunk, len(chunk))
        return logits

    def step_fn(token: int, position: int):
        one[0] = token
        return decode(one, 1)

    result = measure(prefill_fn, step_fn, job)
    system_info = llama_cpp.llama_print_system_info().decode().strip()
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return {**result, "name": f"llama.cpp {job['quant']}", "model_load_ms": load_ms, "threads": threads,
            "model_bytes": os.path.getsize(job["gguf"]),
            "notes": [f"llama-cpp-python {llama_cpp.__version__}, n_batch {batch}, flash attention auto",
                      f"GGUF tensor types {job.get('tensor_types')}", f"system info: {system_info}"]}


def variants(job: dict, quants: List[str], gguf_dir: str, progress) -> List[dict]:
    """Run in the parent: make the GGUFs (in a worker) and return one job overlay per quant type."""
    from sfedge.benchmarks.runner import spawn_worker

    unknown = [q for q in quants if q not in QUANT_TYPES]
    if unknown:
        raise UsageError(f"--quant {','.join(unknown)}: llama.cpp types known here: {', '.join(QUANT_TYPES)}")
    progress(f"llama.cpp: GGUF files {', '.join(quants)} in {gguf_dir} (written and quantized when missing) ...")
    made = check_worker_result(spawn_worker({**job, "kind": "llama.cpp-gguf", "quants": quants, "gguf_dir": gguf_dir},
                                            progress=progress), "making the GGUF files")
    for step, seconds in made["timings"].items():
        progress(f"  {step}: {seconds:.1f} s")
    return [{"quant": quant, "gguf": info["path"], "tensor_types": info["tensor_types"]} for quant, info in made["files"].items()]
