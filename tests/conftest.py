"""Shared fixtures: a tiny model, a generated video, a tiny tokenizer, tiny exports made once per
session. Nothing is downloaded."""
from __future__ import annotations

import atexit
import dataclasses
import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from sfedge import hash_cache
from sfedge.config import get_preset
from sfedge.models import WeightsSource, build_model
from sfedge.runtime.video import make_demo_video


# The tiny preset cut to one LLM layer and one vision block (XNNPACK lowering costs seconds per
# partition, and every ExecuTorch recipe must export in a few minutes), with LLM widths of 128 so that
# the group-128 recipe applies (every linear's input width must be a multiple of its group).
_TINY = get_preset("tiny")
TINY_CUT_CONFIG = _TINY.replace(vision=dataclasses.replace(_TINY.vision, depth=1),
                                  llm=dataclasses.replace(_TINY.llm, layers=1, hidden=128, head_dim=32, intermediate=256))
# ... exported with these options: a static encoder batch of 2 (a padded last batch), prefill chunks of 32,
# and (fp32) an extra 4-frame projector. test_executorch.py and test_profile.py share that fp32 folder.
EXECUTORCH_OPTIONS = dict(max_context=128, prefill_chunk=32, encoder_batch=2)
EXECUTORCH_EXTRA_FRAMES = (4,)
# ... except fp32-sfedge (sfedge's chunk and decode kernels): two LLM layers and a 320-slot cache, so that decoding
# crosses the decode kernel's 128-position blocks and prefill the chunk kernel's 64-key blocks. test_executorch.py's
# parity and test_executorch_decode.py share that folder.
PREFIX_CONFIG = TINY_CUT_CONFIG.replace(llm=dataclasses.replace(TINY_CUT_CONFIG.llm, layers=2))
PREFIX_OPTIONS = dict(EXECUTORCH_OPTIONS, max_context=320)
# pytest-xdist (--dist loadgroup): the tests that read one export run on one worker, one after the other, instead of
# a second worker waiting for the first to make it (see export_once)
PREFIX_EXPORT_GROUP = pytest.mark.xdist_group("executorch_fp32_sfedge")
KERNELS_RECIPE = "fp32-sfedge"


def pytest_configure(config):
    # the verification cache (sfedge/hash_cache.py) of this run, not the user's ~/.cache/sfedge (subprocesses inherit it)
    cache = tempfile.mkdtemp(prefix="sfedge-verify-cache-")
    os.environ[hash_cache.CACHE_DIR_ENV] = cache
    atexit.register(shutil.rmtree, cache, True)
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # pytest-xdist: the workers share the cores; one torch thread each on 2 cores with -n 2
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(workers)))


@pytest.fixture(scope="session")
def tiny_config():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    return build_model(tiny_config, WeightsSource(seed=0), max_seq_len=256)


@pytest.fixture(scope="session")
def demo_video(tmp_path_factory):
    return make_demo_video(tmp_path_factory.mktemp("video") / "demo.mp4", seconds=2.0, fps=12, size=96)


def _export_root(tmp_path_factory) -> Path:
    """Where export_once puts its folders: this session's base temp, or under pytest-xdist (``-n 2``) the run's
    folder that every worker shares, so that each export is made by one worker and reused by the others."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "exports"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def export_once(tmp_path_factory):
    """``export_once(backend, recipe="fp32", config=None, **options)`` -> the folder of that export of the
    tiny preset (or ``config``) with seeded weights (seed 0), named ``<preset>_<backend>_<recipe>``.

    Each distinct set of arguments is exported once per run and the folder is shared by every test (and,
    under pytest-xdist, every worker: the first to ask exports while holding a lock on that export, the others
    wait for it) that asks for it, so it is READ ONLY: a test that changes a file copies it first
    (``shutil.copytree(folder, tmp_path / "copy")``; a tiny folder copies in milliseconds). Tests that
    use it lower or convert a real export: mark them ``@pytest.mark.slow``."""
    from sfedge.export.api import ExportOptions, export_model

    root = _export_root(tmp_path_factory)
    made: dict = {}

    def get(backend: str, recipe: str = "fp32", config=None, **options) -> Path:
        config = config or get_preset("tiny")
        export_options = ExportOptions(backend=backend, recipe=recipe, show_progress=False, **options)
        key = (repr(config), repr(export_options))  # an option given at its default is the same export
        if key not in made:
            name = f"{backend}_{recipe}_{hashlib.sha256(repr(key).encode()).hexdigest()[:12]}"
            folder = root / name / f"{config.name}_{backend}_{recipe}"
            folder.parent.mkdir(exist_ok=True)
            with open(root / f"{name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or its process dies)
                if not (folder / "manifest.json").is_file():  # export_model writes the folder atomically
                    export_model(config, WeightsSource(seed=0), export_options, folder)
            made[key] = folder
        return made[key]

    return get


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_onnx(export_once):
    """The tiny ONNX fp32 export (the cheapest real artifact folder), as `sfedge demo` makes it: read only."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'sfedge[onnx]')")
    return export_once("onnx", max_context=256, prefill_chunk=64)


@pytest.fixture(scope="session")
def executorch_export(export_once):
    """recipe -> the ExecuTorch export of TINY_CUT_CONFIG with EXECUTORCH_OPTIONS, fp32-sfedge of PREFIX_CONFIG with
    PREFIX_OPTIONS (shared, read only)."""
    pytest.importorskip("executorch", reason="the executorch extra is not installed (pip install 'sfedge[executorch]')")

    # one process each (parallel_parts=False): a second process per export would only add its start-up to the
    # suite; test_executorch.py exports 8da4w side by side and finds the same files
    def get(recipe: str) -> Path:
        if recipe == KERNELS_RECIPE:
            return export_once("executorch", recipe, config=PREFIX_CONFIG, parallel_parts=False, **PREFIX_OPTIONS)
        return export_once("executorch", recipe, config=TINY_CUT_CONFIG, parallel_parts=False, **EXECUTORCH_OPTIONS,
                           extra_frames=EXECUTORCH_EXTRA_FRAMES if recipe == "fp32" else ())

    return get
