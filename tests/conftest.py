"""Shared fixtures: a tiny model, a generated video, a tiny tokenizer. Nothing is downloaded."""
from __future__ import annotations

import pytest
import torch

from sfedge.config import get_preset
from sfedge.models import WeightsSource, build_model
from sfedge.runtime.video import make_demo_video


@pytest.fixture(scope="session")
def tiny_config():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    return build_model(tiny_config, WeightsSource(seed=0), max_seq_len=256)


@pytest.fixture(scope="session")
def demo_video(tmp_path_factory):
    return make_demo_video(tmp_path_factory.mktemp("video") / "demo.mp4", seconds=2.0, fps=12, size=96)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
