"""Calibration frames for static int8 (QDQ) quantization of the ONNX vision encoder.

Frames come from a video the user passes at export (``sfedge export --calibration-video``), sampled
uniformly and preprocessed exactly as ``sfedge run`` does, or, without one, from synthetic frames
(colour gradients, a moving square and fine texture) that cover the pixel range. Real frames of the
target domain give better activation ranges; the synthetic ones keep exports self-contained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

DEFAULT_FRAMES = 8


def synthetic_frames(size: int, count: int = DEFAULT_FRAMES, seed: int = 0) -> np.ndarray:
    """uint8 RGB [count, size, size, 3]: gradients, a moving square and per-pixel texture."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    frames = np.empty((count, size, size, 3), dtype=np.float32)
    for i in range(count):
        frames[i, ..., 0] = ramp[None, :]
        frames[i, ..., 1] = ramp[:, None]
        frames[i, ..., 2] = 255.0 * i / max(count - 1, 1)
        x, side = int((size - size // 4) * i / max(count - 1, 1)), size // 4
        frames[i, size // 3: size // 3 + side, x: x + side] = rng.uniform(0, 255, 3)
    frames += rng.normal(0, 24, frames.shape)
    return np.clip(frames, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class CalibrationSet:
    pixels: np.ndarray  # float32 [frames, 3, S, S], normalized
    source: str  # the video's path, or "synthetic"

    def describe(self) -> dict:
        return {"frames": int(self.pixels.shape[0]), "source": self.source}


def calibration_pixels(vision, video: Optional[str] = None, count: int = DEFAULT_FRAMES) -> CalibrationSet:
    """``count`` normalized frames for ``vision`` (a VisionConfig), from ``video`` or synthetic."""
    from sfedge.runtime.video import load_video, preprocess

    frames = (load_video(video, vision.frame_size, count).frames if video
              else synthetic_frames(vision.frame_size, count))
    return CalibrationSet(preprocess(frames, vision.pixel_mean, vision.pixel_std).numpy(), str(video or "synthetic"))


class FramesReader(CalibrationDataReader):
    """ONNX Runtime's calibration reader over batches of one frame. ``set_range`` serves quantize_static's
    ``CalibStridedMinMax``: ranges are reduced after every stride, so the activations of only one frame
    are held at a time (a 1B-size ViT keeps about 1 GB of them per frame)."""

    def __init__(self, input_name: str, pixels: np.ndarray):
        self.input_name, self.pixels = input_name, pixels
        self._batches: Iterator[np.ndarray] = iter(())
        self.set_range(0, len(pixels))

    def __len__(self) -> int:
        return len(self.pixels)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._batches = iter([frame[None] for frame in self.pixels[start_index:end_index]])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self.set_range(0, len(self.pixels))
