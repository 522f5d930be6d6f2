"""Frames as they arrive: encode each sampled frame on arrival into a bounded window, so a question
only pays the projector and the prefill.

    stream = pipeline.open_stream(frames_from(0))          # a camera index, a file, a cv2 capture or a generator
    stream.start()                                        # a background thread pulls, samples and encodes frames
    for piece in stream.ask("What is happening now?"): ...

Sampling policy for a live stream (``fps`` over a sliding window): a frame is kept when at least
1/sample_fps seconds passed since the last kept frame (by its timestamp, so a variable frame rate
or dropped frames are handled); its features go into a window of the frame budget (the export's
static frame count, or the preset's SlowFast ``frames``), and the oldest features fall out. So the
window always covers the last ``budget / sample_fps`` seconds, and memory holds at most ``budget``
encoded frames however long the stream runs. At a question the window is projected (a window not
yet full is resampled to the budget when the projector's shape is static, repeating frames as the
offline path does for short videos) and prefilled; questions on an unchanged window reuse its
prefix like ``open_video``. The session is shared under one lock: a question waits for the frame
being encoded, and frames wait (a camera drops them) while a question is answered.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Deque, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from sfedge.errors import SfedgeError, UsageError
from sfedge.runtime.chat import VideoChat
from sfedge.runtime.sampling import SamplingConfig
from sfedge.runtime.stats import RunStats, now_ms
from sfedge.runtime.video import preprocess, resize_frame

if TYPE_CHECKING:  # pragma: no cover
    from sfedge.runtime.pipeline import Pipeline, VideoOptions


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # [H, W, 3] uint8 RGB
    timestamp: float  # seconds


def _capture_frames(capture, where: str, realtime: bool = False) -> Iterator[Frame]:
    """Frames of an OpenCV capture (camera or file); ``realtime`` delivers them at their own timestamps."""
    import cv2

    if not capture.isOpened():
        raise SfedgeError(f"{where} could not be opened by OpenCV")
    fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    start, index = time.monotonic(), 0
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            ms = capture.get(cv2.CAP_PROP_POS_MSEC)
            timestamp = ms / 1e3 if ms else (index / fps if fps else time.monotonic() - start)
            if realtime:
                delay = timestamp - (time.monotonic() - start)
                if delay > 0:
                    time.sleep(delay)
            index += 1
            yield Frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), timestamp)
    finally:
        capture.release()


def frames_from(source, realtime: bool = False) -> Iterator[Frame]:
    """An iterator of Frames from a camera index, a video file, an OpenCV capture, or an iterable of
    Frame / (image, timestamp) pairs. ``realtime`` replays a file at its own frame rate (as a camera would)."""
    import cv2

    if isinstance(source, bool):
        raise UsageError(f"not a frame source: {source!r}")
    if isinstance(source, int):
        return _capture_frames(cv2.VideoCapture(source), f"camera {source}")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise SfedgeError(f"video {path} does not exist or is not a file")
        return _capture_frames(cv2.VideoCapture(str(path), cv2.CAP_FFMPEG), str(path), realtime)
    if hasattr(source, "read") and hasattr(source, "isOpened"):
        return _capture_frames(source, "the OpenCV capture", realtime)
    return (item if isinstance(item, Frame) else Frame(*item) for item in source)


class VideoStream:
    """A bounded window of encoded frames fed from an iterator, and a chat over the current window."""

    def __init__(self, pipeline: "Pipeline", frames: Iterable, options: "VideoOptions", window: Optional[int] = None):
        if options.sample_fps <= 0:
            raise UsageError(f"--sample-fps must be > 0, got {options.sample_fps}")
        self.pipeline = pipeline
        self.session = pipeline.session
        self.options = options
        self.window_size = window or pipeline.frames_to_sample(options)
        self.frames = frames if isinstance(frames, Iterator) else frames_from(frames)
        self.window: Deque[Tuple[float, torch.Tensor]] = deque(maxlen=self.window_size)  # (timestamp, features)
        self.lock = threading.RLock()
        self.frames_seen = 0
        self.frames_encoded = 0
        self.encode_ms = 0.0
        self.last_frame_ms: Optional[float] = None  # now_ms() when the last frame was taken in
        self.error: Optional[BaseException] = None
        self._last_kept: Optional[float] = None
        self._version = 0  # bumped whenever the window changes
        self._prefix_version = -1
        self._thread: Optional[threading.Thread] = None
        self.chat = VideoChat(pipeline)

    # --- frames in ----------------------------------------------------------------------------------

    def keeps(self, timestamp: float) -> bool:
        return self._last_kept is None or timestamp - self._last_kept >= 1.0 / self.options.sample_fps - 1e-6

    def push(self, frame: Frame) -> bool:
        """Take one frame; encode it into the window when the fps policy keeps it. Returns whether it was kept."""
        self.frames_seen += 1
        self.last_frame_ms = now_ms()
        if not self.keeps(frame.timestamp):
            return False
        self._last_kept = frame.timestamp
        config = self.pipeline.config
        rgb = resize_frame(np.ascontiguousarray(frame.image), config.vision.frame_size)
        pixels = preprocess(rgb[None], config.vision.pixel_mean, config.vision.pixel_std)
        with self.lock:
            start = now_ms()
            features = self.pipeline.encode_frames(pixels)
            self.encode_ms += now_ms() - start
            self.window.append((frame.timestamp, features[0].clone()))
            self.frames_encoded += 1
            self._version += 1
        return True

    def run(self) -> None:
        """Pull every frame of the source (returns when it ends)."""
        for frame in self.frames:
            self.push(frame)

    def start(self) -> "VideoStream":
        def target():
            try:
                self.run()
            except BaseException as exc:  # reported by wait() / ask()
                self.error = exc

        self._thread = threading.Thread(target=target, name="sfedge-stream", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the source to end; True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        self._raise()
        return self._thread is None or not self._thread.is_alive()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    # --- questions ----------------------------------------------------------------------------------

    def window_features(self) -> torch.Tensor:
        if not self.window:
            raise SfedgeError("no frame has arrived yet: the stream has not delivered a sampled frame")
        features = [f for _, f in self.window]
        if self.session.frame_counts and len(features) != self.window_size:  # static projector: exactly the budget
            picks = np.linspace(0, len(features) - 1, self.window_size).round().astype(int)
            features = [features[i] for i in picks]
        return torch.stack(features)

    def ask(self, question: str, follow_up: bool = False, max_new_tokens: int = 64,
            sampling: SamplingConfig = SamplingConfig(), eos_ids: Optional[Sequence[int]] = None) -> Iterator[str]:
        """Answer about the current window; ``self.chat.last_stats`` holds the timings (TTFT from this call,
        including the projector and the prefix prefill when the window changed)."""
        start = now_ms()
        self._raise()
        with self.lock:
            stats = RunStats(frames=len(self.window))
            if self._prefix_version != self._version:
                visual = self.pipeline.project(self.window_features(), stats)
                stats.prefill_ms = self.chat.set_visual(visual)
                self._prefix_version = self._version
                follow_up = False  # a new window is a new prefix
            prefix_prefill_ms, projector_ms = stats.prefill_ms, stats.projector_ms
            yield from self.chat.ask(question, follow_up, max_new_tokens, sampling, clock_start=start, eos_ids=eos_ids)
            asked = self.chat.last_stats
            asked.projector_ms = projector_ms
            asked.prefill_ms += prefix_prefill_ms
            asked.frames = len(self.window)
            asked.vision_encode_ms = self.encode_ms


def open_stream(pipeline: "Pipeline", frames, options: "VideoOptions", window: Optional[int] = None,
                realtime: bool = False) -> VideoStream:
    source = frames if isinstance(frames, Iterator) else frames_from(frames, realtime)
    return VideoStream(pipeline, source, options, window)
