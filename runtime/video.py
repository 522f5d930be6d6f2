"""Video decode (OpenCV) and frame sampling.

Robust to variable frame rate (timestamps come from the decoder, not from index / fps), rotation
metadata (OpenCV's orientation auto-correction is switched on), and containers whose frame-count
header is wrong (frames are counted by decoding, never taken from the header). Still images
(jpg/png/...) are a one-frame video.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import numpy as np

from sfedge.errors import SfedgeError, UsageError
from sfedge.registry import Registry

TEXT_CODECS = {b"ansi"}  # FFmpeg's tty demuxer "decodes" .txt/.nfo/.asc/... files as ANSI-art video
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class FrameSample:
    indices: List[int]  # decoded-frame indices, in time order (repeats allowed)
    timestamps: List[float]  # seconds


@dataclass
class DecodedVideo:
    path: str
    frames: np.ndarray  # [T, S, S, 3] uint8 RGB, resized to the encoder's frame size
    sample: FrameSample
    total_frames: int  # frames actually decoded (not the header's count)
    header_frames: int
    duration_s: float


# --- sampling policies: (timestamps of every decoded frame, max frames, fps) -> FrameSample -------

SamplingPolicy = Callable[[List[float], int, float], FrameSample]
SAMPLING: Registry[SamplingPolicy] = Registry("frame sampling policy")


def _pick(timestamps: List[float], indices: List[int]) -> FrameSample:
    return FrameSample(indices=indices, timestamps=[timestamps[i] for i in indices])


@SAMPLING.register("uniform")
def sample_uniform(timestamps: List[float], max_frames: int, fps: float = 0.0) -> FrameSample:
    """SF-LLaVA v1: frame i = (round(s*i) + round(s*(i+1))) // 2 with s = (total - 1) / n."""
    total = len(timestamps)
    step = (total - 1) / max_frames
    return _pick(timestamps, [(int(round(step * i)) + int(round(step * (i + 1)))) // 2 for i in range(max_frames)])


@SAMPLING.register("fps")
def sample_fps(timestamps: List[float], max_frames: int, fps: float = 1.0) -> FrameSample:
    """The paper's rule: one frame every 1/fps seconds (nearest decoded timestamp, so variable frame
    rate is handled); when that gives more than max_frames, fall back to uniform sampling."""
    if not math.isfinite(fps) or fps <= 0:
        raise UsageError(f"--sample-fps must be > 0, got {fps}")
    ts = np.asarray(timestamps)
    targets = np.arange(ts[0], ts[-1] + 1e-9, 1.0 / fps)
    if len(targets) > max_frames:
        return sample_uniform(timestamps, max_frames)
    nearest = np.clip(np.searchsorted(ts, targets), 0, len(ts) - 1)
    previous = np.clip(nearest - 1, 0, len(ts) - 1)
    closer = np.where(np.abs(ts[previous] - targets) <= np.abs(ts[nearest] - targets), previous, nearest)
    return _pick(timestamps, sorted(dict.fromkeys(int(i) for i in closer)))


def resample_to(sample: FrameSample, frames: int) -> FrameSample:
    """Exactly ``frames`` entries drawn uniformly from a sample (an artifact with a static frame
    count needs exactly that many; short videos repeat frames)."""
    if len(sample.indices) == frames:
        return sample
    picks = np.linspace(0, len(sample.indices) - 1, frames).round().astype(int)
    return FrameSample([sample.indices[i] for i in picks], [sample.timestamps[i] for i in picks])


# --- decoding -----------------------------------------------------------------------------------

def resize_frame(rgb: np.ndarray, size: int) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    interpolation = cv2.INTER_AREA if min(h, w) >= size else cv2.INTER_CUBIC
    return cv2.resize(rgb, (size, size), interpolation=interpolation)


def check_video_file(path: str | Path) -> None:
    """Cheap checks before any model is built: the path is a non-empty readable file."""
    path = Path(path)
    if not path.exists():
        raise SfedgeError(f"video {path} does not exist")
    if path.is_dir():
        raise SfedgeError(f"video {path} is a folder; pass a video or image file")
    if path.stat().st_size == 0:
        raise SfedgeError(f"video {path} is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise SfedgeError(f"video {path} is not readable (permission denied)")


def _open(path: Path):
    import cv2

    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        raise SfedgeError(f"{path} is not a readable video (OpenCV/FFmpeg could not open it); "
                          "pass an mp4/mkv/avi/webm/mov video or a jpg/png image")
    fourcc = int(capture.get(cv2.CAP_PROP_FOURCC) or 0).to_bytes(4, "little")
    if fourcc in TEXT_CODECS:
        capture.release()
        raise SfedgeError(f"{path} is a text file, not a video; pass an mp4/mkv/avi/webm/mov video or a jpg/png image")
    capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    return capture


def _timestamps(path: Path) -> tuple[List[float], int]:
    """Decode once to count frames and read each frame's presentation time."""
    import cv2

    capture = _open(path)
    header = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    stamps: List[float] = []
    while capture.grab():
        ms = capture.get(cv2.CAP_PROP_POS_MSEC)
        stamps.append(ms / 1e3 if ms or not stamps else (len(stamps) / fps if fps else float(len(stamps))))
    capture.release()
    # some containers report 0 for every frame: fall back to index / fps
    if len(stamps) > 1 and len(set(stamps)) == 1:
        stamps = [i / fps if fps else float(i) for i in range(len(stamps))]
    for i in range(1, len(stamps)):  # keep time monotonic for searchsorted
        stamps[i] = max(stamps[i], stamps[i - 1])
    return stamps, header


def _read_selected(path: Path, indices: List[int], size: int) -> np.ndarray:
    import cv2

    wanted = sorted(set(indices))
    capture = _open(path)
    frames: dict[int, np.ndarray] = {}
    index, cursor = 0, 0
    while cursor < len(wanted) and capture.grab():
        if index == wanted[cursor]:
            ok, bgr = capture.retrieve()
            if not ok:
                break
            frames[index] = resize_frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size)
            cursor += 1
        index += 1
    capture.release()
    if len(frames) != len(wanted):
        raise SfedgeError(f"{path}: frames {sorted(set(wanted) - set(frames))[:5]} could not be decoded on the second pass")
    return np.stack([frames[i] for i in indices])


def load_video(path: str | Path, frame_size: int, max_frames: int, policy: str = "uniform", fps: float = 1.0) -> DecodedVideo:
    """Decode, sample and resize. ``policy``: "uniform" (v1 formula) or "fps" (the paper's rule)."""
    import cv2

    path = Path(path)
    check_video_file(path)
    sampler = SAMPLING.get(policy)
    if max_frames < 1:
        raise UsageError(f"max frames must be >= 1, got {max_frames}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        except cv2.error as exc:  # e.g. a header claiming more pixels than OpenCV's limit
            raise SfedgeError(f"{path} is not a readable image ({str(exc).strip().splitlines()[-1]})") from None
        if bgr is None:
            raise SfedgeError(f"{path} is not a readable image")
        rgb = resize_frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), frame_size)
        return DecodedVideo(str(path), rgb[None], FrameSample([0], [0.0]), 1, 1, 0.0)
    stamps, header = _timestamps(path)
    if not stamps:
        raise SfedgeError(f"{path} has no decodable video frames (corrupt, audio-only or not a video)")
    sample = sampler(stamps, max_frames, fps)
    frames = _read_selected(path, sample.indices, frame_size)
    return DecodedVideo(str(path), frames, sample, len(stamps), header, stamps[-1] - stamps[0])


def preprocess(frames: np.ndarray, mean: float, std: float):
    """uint8 RGB [T, S, S, 3] -> float32 [T, 3, S, S]: x / 255, then (x - mean) / std."""
    import torch

    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    return pixels.sub_(mean).div_(std).contiguous()


def make_demo_video(path: str | Path, seconds: float = 2.0, fps: int = 12, size: int = 160) -> Path:
    """A short synthetic video (a square moving over a colour gradient), written with OpenCV."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    if not writer.isOpened():
        raise SfedgeError(f"OpenCV cannot write {path} (no mp4v encoder in this OpenCV build)")
    count = max(int(seconds * fps), 1)
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    for i in range(count):
        frame = np.zeros((size, size, 3), np.uint8)
        frame[..., 0] = ramp[None, :]
        frame[..., 1] = ramp[:, None]
        frame[..., 2] = int(255 * i / count)
        x = int((size - size // 4) * i / max(count - 1, 1))
        frame[size // 3: size // 3 + size // 4, x: x + size // 4] = (0, 0, 255)
        writer.write(frame)
    writer.release()
    return path
