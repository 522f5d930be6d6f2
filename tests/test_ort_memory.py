"""ONNX Runtime memory: the vision graphs run without ORT's CPU arena (their buffers go back to the OS after
each call, not held under the LLM's prefill), the LLM graphs keep it, and the heap that loading freed is
given back (malloc_trim), so a process's resident set after opening a folder is what is live."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest

from sfedge.manifest import Component
from sfedge.memory import current_rss, release_free_heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_free_heap_gives_freed_pages_back():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, count = 64 << 10, 2048  # 128 MiB in blocks under the mmap threshold: they come from the heap
    blocks = [libc.malloc(block) for _ in range(count)]
    for address in blocks:
        ctypes.memset(address, 1, block)  # resident
    pin = libc.malloc(block)  # above them: the heap's top cannot shrink past it, so free() alone keeps the pages
    for address in blocks:
        libc.free(address)
    before = current_rss()
    assert release_free_heap()
    released = before - current_rss()
    libc.free(pin)
    assert released > 64 << 20, f"malloc_trim gave back only {released >> 20} MiB of 128 freed"


def test_vision_graphs_run_without_the_arena_llm_graphs_with_it():
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'sfedge[onnx]')")
    from sfedge.runtime.sessions import SessionOptions
    from sfedge.runtime.sessions.onnxruntime import session_options

    arena = {c.value: session_options(ort, SessionOptions(threads=2), c.value).enable_cpu_mem_arena for c in Component}
    assert arena == {Component.VISION_ENCODER.value: False, Component.PROJECTOR.value: False,
                     Component.TOKEN_EMBEDDING.value: True, Component.TEXT_DECODER.value: True}
    assert session_options(ort, SessionOptions(threads=2), Component.PROJECTOR.value).intra_op_num_threads == 2
    assert session_options(ort, SessionOptions(), Component.TEXT_DECODER.value).intra_op_num_threads == 0  # ORT's default


@pytest.mark.slow
def test_opened_onnx_session_carries_the_options(tiny_onnx):
    from sfedge.runtime.sessions import SessionOptions, open_session

    session = open_session(tiny_onnx, SessionOptions(threads=1))
    arena = {name: graph.session.get_session_options().enable_cpu_mem_arena for name, graph in session.graphs.items()}
    assert arena[Component.VISION_ENCODER.value] is False and arena[Component.TEXT_DECODER.value] is True
    assert arena[Component.TOKEN_EMBEDDING.value] is True
    projectors = [name for name in arena if name.startswith(Component.PROJECTOR.value)]
    assert projectors and not any(arena[name] for name in projectors)
