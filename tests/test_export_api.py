"""export_model()'s checks that run before any backend work, and the atomic output folder."""
import pytest

from sfedge.config import get_preset
from sfedge.errors import SfedgeError, UsageError
from sfedge.export.api import ExportOptions, export_model
from sfedge.export.common import atomic_output_dir
from sfedge.models import WeightsSource


def test_context_too_small_for_the_prompt(tmp_path):
    with pytest.raises(UsageError, match="cannot hold the 84-token prompt of 8 frames"):
        export_model(get_preset("tiny"), WeightsSource(), ExportOptions(backend="onnx", max_context=64), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unknown_recipe_lists_the_known_ones(tmp_path):
    with pytest.raises(UsageError, match="unknown onnx quantization recipe 'int3'; known: .*int4"):
        export_model(get_preset("tiny"), WeightsSource(), ExportOptions(backend="onnx", recipe="int3"), tmp_path / "x")


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(SfedgeError, match="already exists; pass --overwrite"):
        with atomic_output_dir(tmp_path / "out"):
            pass


def test_failure_leaves_no_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_success_replaces_atomically(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "manifest.json").write_text("{}")  # --overwrite replaces only an sfedge export (or an empty folder)
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
