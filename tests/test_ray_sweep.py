"""Sweeps on Ray: a local Ray instance runs a tiny sweep (eager tiny preset), one task per case in a
fresh worker process, and yields the same cases and record schema as the local runner, plus the
node's hostname."""
from __future__ import annotations

import socket

import pytest

from sfedge.benchmarks.runner import load_document
from sfedge.cli import main

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'sfedge[ray]')")

SWEEP = ["bench", "--model", "tiny", "--frames", "2,4", "--gen-tokens", "4", "--threads", "1", "-r", "1", "--warmup", "0",
         "--output", "json"]


def _schema(record: dict) -> set:
    return set(record) - {"hostname", "node_cpu"}


def test_ray_sweep_matches_local(tmp_path, demo_video):
    local, remote = tmp_path / "local.json", tmp_path / "ray.json"
    common = [*SWEEP, "--video", str(demo_video)]
    assert main([*common, "--out", str(local)]) == 0
    try:
        assert main([*common, "--out", str(remote), "--ray", "--ray-resource", "device:ci"]) == 0
    finally:
        ray.shutdown()
    local_doc, ray_doc = load_document(str(local)), load_document(str(remote))
    assert [r["key"] for r in ray_doc["results"]] == [r["key"] for r in local_doc["results"]] == \
        ["tiny@eager f2+tg4+t1", "tiny@eager f4+tg4+t1"]
    assert set(ray_doc["limits"]) == set(local_doc["limits"])
    for here, there in zip(local_doc["results"], ray_doc["results"]):
        assert there["status"] == here["status"] == "ok"
        assert _schema(there) == _schema(here)
        assert set(there["metrics"]) == set(here["metrics"])
        assert there["hostname"] == socket.gethostname() and "hostname" not in here
        assert there["threads"] == 1 and there["visual_tokens"] == here["visual_tokens"]


def test_ray_usage_errors(capsys):
    assert main(["bench", "--model", "tiny", "--ray-resource", "device:x", "--list"]) == 0  # --list runs nothing
    assert main(["bench", "--model", "tiny", "--ray-resource", "gpu", "--no-limits"]) == 2
    assert "--ray-resource takes device:NAME" in capsys.readouterr().err
