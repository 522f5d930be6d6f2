"""A part exported in a second process: results and errors come back to the parent, the parent's memory sampler
counts the child, and the ExecuTorch exporter runs the vision parts beside the LLM only when memory allows."""
from __future__ import annotations

import os
import time

import pytest

from sfedge.errors import SfedgeError, UsageError
from sfedge.export.part_process import PartProcess
from sfedge.memory import RssSampler, current_rss, rss_with


def _square(x):
    return x * x


def _refuse(name):
    raise UsageError(f"--frames {name} is not a number")


def _crash():
    return {}["missing key"]


def _die():
    os._exit(3)


def _hold(megabytes, seconds):
    block = bytearray(megabytes * 2**20)  # bytearray fills with zeros: resident
    time.sleep(seconds)
    return len(block)


def test_a_child_returns_its_result():
    with PartProcess("square", _square, 12) as child:
        assert child.result() == 144


def test_a_childs_sfedge_error_is_raised_as_itself():
    with PartProcess("vision", _refuse, "x") as child, pytest.raises(UsageError, match="--frames x is not a number"):
        child.result()


def test_a_childs_crash_is_one_line_naming_the_part():
    with PartProcess("vision encoder", _crash) as child, \
            pytest.raises(SfedgeError, match="the vision encoder export process failed: KeyError: 'missing key'"):
        child.result()


def test_a_child_that_dies_is_reported_with_its_exit_code():
    with PartProcess("vision encoder", _die) as child, \
            pytest.raises(SfedgeError, match=r"ended without a result \(exit code 3.*--serial"):
        child.result()


def test_leaving_the_block_early_kills_the_child():
    with pytest.raises(RuntimeError):
        with PartProcess("sleeper", _hold, 1, 60) as child:
            process = child._process
            raise RuntimeError("the parent failed")
    assert not process.is_alive()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc")
def test_the_sampler_counts_the_named_child_and_keeps_the_peak():
    sampler = RssSampler(interval=0.02)
    with sampler, PartProcess("holder", _hold, 300, 4) as child:
        sampler.child_pids = (child.pid,)
        deadline = time.time() + 30
        while rss_with([child.pid]) - current_rss() < 250 * 2**20 and time.time() < deadline:
            time.sleep(0.1)
        assert rss_with([child.pid]) - current_rss() >= 250 * 2**20, "the child's 300 MiB were not counted"
        time.sleep(0.2)
        assert child.result() == 300 * 2**20
    assert sampler.tree_peak >= current_rss() + 250 * 2**20
    assert rss_with([child.pid]) == pytest.approx(current_rss(), abs=2**20)  # an ended child counts nothing


def test_the_vision_parts_go_beside_the_llm_only_when_both_fit(monkeypatch, capsys):
    pytest.importorskip("executorch", reason="the executorch extra is not installed (pip install 'sfedge[executorch]')")
    from sfedge.config import get_preset
    from sfedge.export import executorch as et_export
    from sfedge.export.api import ExportOptions
    from sfedge.export.common import Progress, build_parts_lazily
    from sfedge.export.memory_estimate import estimate_export_peak, side_by_side_peak
    from sfedge.models import WeightsSource, empty_model
    from sfedge.quantize.recipes import get_recipe

    model = empty_model(get_preset("sf-llava-1.5-3b"), WeightsSource(seed=0), 2048)
    build_parts_lazily(model, WeightsSource(seed=0))
    recipe, options = get_recipe("executorch", "8da4w"), ExportOptions(backend="executorch", recipe="8da4w", max_context=2048)
    alone = estimate_export_peak(model, "executorch", "8da4w").peak_bytes
    both = side_by_side_peak(model, "executorch", "8da4w", et_export.CHILD_PARTS)
    assert alone < both < alone + 3 * 2**30  # the 3B's vision encoder (~1.6 GiB float32) beside the LLM
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    progress = Progress()
    monkeypatch.setenv("SFEDGE_MEMORY_LIMIT", str(both))
    assert et_export._vision_beside_llm(model, options, recipe, progress)
    assert "a second process, beside the LLM" in capsys.readouterr().err
    monkeypatch.setenv("SFEDGE_MEMORY_LIMIT", str(both - 2**20))
    assert not et_export._vision_beside_llm(model, options, recipe, progress)
    assert "vision encoder + projectors: this process" in capsys.readouterr().err
    assert not et_export._vision_beside_llm(model, ExportOptions(backend="executorch", parallel_parts=False), recipe, progress)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    monkeypatch.setenv("SFEDGE_MEMORY_LIMIT", str(both))
    assert not et_export._vision_beside_llm(model, options, recipe, progress)
