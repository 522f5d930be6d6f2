"""The export's output folder: checked before the model is built, --overwrite only replaces an sfedge export and
puts it back when the final rename fails, SIGTERM unwinds like SIGINT, and the temporary folder of a
SIGKILLed export is reclaimed by the next export into the same parent."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sfedge.export.api as api
from sfedge.cli import main
from sfedge.config import get_preset
from sfedge.errors import SfedgeError
from sfedge.export.api import ExportOptions, export_model
from sfedge.export.common import atomic_output_dir, reclaim_stale
from sfedge.models import WeightsSource


class Built(Exception):
    """Raised by the patched build_model: the output checks passed and the export went on to build."""


@pytest.fixture
def no_build(monkeypatch):
    def build(*args, **kwargs):
        raise Built()

    monkeypatch.setattr(api, "build_model", build)


def _export(out, overwrite=False):
    export_model(get_preset("tiny"), WeightsSource(), ExportOptions(backend="onnx", overwrite=overwrite, show_progress=False), out)


def _leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def _cases(tmp_path: Path) -> dict:
    (tmp_path / "exists").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "not_an_export").mkdir()
    (tmp_path / "not_an_export" / "notes.txt").write_text("mine")
    return {"exists": (tmp_path / "exists", False, "already exists; pass --overwrite"),
            "parent is a file": (tmp_path / "a_file" / "sub", False, r"a_file is a file, not a folder"),
            "out is a file": (tmp_path / "a_file", True, "exists and is not a folder"),
            "empty": ("", False, "--out is empty"),
            "proc": ("/proc/x", False, r"/proc/x"),
            "not an export": (tmp_path / "not_an_export", True, "refusing to replace .*not_an_export: it has no manifest.json")}


@pytest.mark.parametrize("case", ["exists", "parent is a file", "out is a file", "empty", "proc", "not an export"])
def test_the_output_folder_is_checked_before_the_model_is_built(tmp_path, no_build, case):
    out, overwrite, message = _cases(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SfedgeError, match=message) as info:
        _export(out, overwrite)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "not_an_export" / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_parent_is_refused_before_the_build(tmp_path, no_build):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(SfedgeError, match="ro is not writable"):
            _export(parent / "out")
    finally:
        parent.chmod(0o700)


def test_overwrite_accepts_an_empty_folder_and_an_export(tmp_path, no_build):
    (tmp_path / "empty").mkdir()
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "manifest.json").write_text("{}")
    for name in ("empty", "export"):
        with pytest.raises(Built):
            _export(tmp_path / name, overwrite=True)
        assert (tmp_path / name).is_dir()
    assert _leftovers(tmp_path) == []


def test_a_failed_export_removes_the_parents_it_created(tmp_path, no_build):
    with pytest.raises(Built):
        _export(tmp_path / "a" / "b" / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, code, message", [
    (["--out", ""], 2, "--out is empty"),
    (["--out", "/proc/x"], 1, "cannot create the output folder /proc/x"),
])
def test_cli_bad_out_is_one_line(tmp_path, no_build, capsys, argv, code, message):
    assert main(["export", "--model", "tiny", "--backend", "onnx", *argv]) == code
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_a_failed_rename_during_overwrite_restores_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    real = Path.rename
    failed = []

    def rename(self, target):
        if ".partial-" in self.name and not failed:
            failed.append(self)
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(SfedgeError, match="cannot move the export into .*out: No space left on device"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("new")
    assert failed and (out / "manifest.json").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_sigterm_handler_is_installed_only_during_the_export(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    seen = []
    with atomic_output_dir(tmp_path / "out"):
        seen.append(signal.getsignal(signal.SIGTERM))
    assert seen[0] is not previous and signal.getsignal(signal.SIGTERM) is previous


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_folders_of_dead_processes_are_reclaimed(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".out.partial-{dead}-abc123"
    live = tmp_path / f".out.partial-{os.getpid()}-def456"
    old = tmp_path / f".other.old-{dead}"
    for folder in (stale, live, old):
        folder.mkdir()
    (old / "manifest.json").write_text("complete")
    (tmp_path / ".notes.partial-x").mkdir()  # not ours: no pid
    reclaim_stale(tmp_path)
    assert not stale.exists() and live.exists() and (tmp_path / ".notes.partial-x").exists()
    assert (tmp_path / "other" / "manifest.json").read_text() == "complete"  # an interrupted --overwrite, put back


def _start_export(out: Path) -> subprocess.Popen:
    sfedge = Path(sys.executable).with_name("sfedge")
    return subprocess.Popen([str(sfedge), "export", "--model", "tiny", "--backend", "onnx", "--quant", "fp32", "--out", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def _wait_until_exporting(proc: subprocess.Popen, parent: Path, timeout: float = 180.0) -> None:
    """Return once the export traces its first graph (the temporary folder exists and holds work)."""
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        if ": trace ..." in line:
            assert any(".partial-" in p.name for p in parent.iterdir())
            return
        assert time.monotonic() < deadline, "the export did not start tracing in time"
    raise AssertionError(f"the export ended before tracing (exit {proc.wait()})")


@pytest.mark.slow
def test_sigterm_mid_export_leaves_no_partial_folder(tmp_path):
    pytest.importorskip("onnxruntime")
    proc = _start_export(tmp_path / "out")
    try:
        _wait_until_exporting(proc, tmp_path)
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert code == 128 + signal.SIGTERM, rest
    assert "terminated" in rest and "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigkill_mid_export_is_reclaimed_by_the_next_export(tmp_path, no_build):
    pytest.importorskip("onnxruntime")
    proc = _start_export(tmp_path / "out")
    try:
        _wait_until_exporting(proc, tmp_path)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert len(_leftovers(tmp_path)) == 1  # SIGKILL cannot be handled: the temporary folder stays
    with pytest.raises(Built):  # the next export into the same parent (stopped after its output checks)
        _export(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
