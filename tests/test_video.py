"""Video decode and sampling on files made here (OpenCV and the ffmpeg binary of imageio-ffmpeg)."""
import subprocess

import cv2
import numpy as np
import pytest

from sfedge.errors import SfedgeError, UsageError
from sfedge.runtime.video import load_video, preprocess, resample_to, sample_fps, sample_uniform


def ffmpeg(*args):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="imageio-ffmpeg provides the ffmpeg binary for test videos")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def test_uniform_is_the_v1_formula():
    stamps = [i / 10 for i in range(100)]
    sample = sample_uniform(stamps, 8)
    step = 99 / 8
    assert sample.indices == [(round(step * i) + round(step * (i + 1))) // 2 for i in range(8)]
    assert sample.timestamps == [stamps[i] for i in sample.indices]


def test_fps_policy_falls_back_to_uniform_past_the_cap():
    stamps = [i / 30 for i in range(300)]  # 10 s at 30 fps
    assert sample_fps(stamps, 64, fps=1.0).indices == [30 * i for i in range(10)]
    assert sample_fps(stamps, 8, fps=1.0) == sample_uniform(stamps, 8)
    with pytest.raises(UsageError):
        sample_fps(stamps, 8, fps=0)


def test_demo_video_decodes_to_frame_size(demo_video):
    video = load_video(demo_video, 64, 8)
    assert video.frames.shape == (8, 64, 64, 3) and video.frames.dtype == np.uint8
    assert video.total_frames == 24 and len(video.sample.indices) == 8
    pixels = preprocess(video.frames, 0.5, 0.5)
    assert pixels.shape == (8, 3, 64, 64) and -1.0 <= pixels.min() and pixels.max() <= 1.0


def test_resample_to_a_static_frame_count():
    from sfedge.runtime.video import FrameSample

    sample = FrameSample([0, 5, 9], [0.0, 0.5, 0.9])
    assert resample_to(sample, 3) is sample
    assert len(resample_to(sample, 8).indices) == 8 and resample_to(sample, 8).indices[0] == 0


def test_variable_frame_rate_uses_real_timestamps(tmp_path):
    path = tmp_path / "vfr.mp4"
    # 10 frames 0.2 s apart, then 20 frames 0.05 s apart: index / average fps would be wrong by up to 0.5 s
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x96:rate=30", "-frames:v", "30", "-vf",
           "setpts='if(lt(N,10),N*0.2,2+(N-10)*0.05)/TB'", "-fps_mode", "vfr", "-c:v", "mpeg4", str(path))
    video = load_video(path, 64, 64, policy="fps", fps=2.0)
    for target, stamp in zip(np.arange(0, 3.0, 0.5), video.sample.timestamps):
        assert abs(stamp - target) <= 0.11


def test_rotation_metadata_is_applied(tmp_path):
    plain, rotated = tmp_path / "plain.mp4", tmp_path / "rotated.mp4"
    writer = cv2.VideoWriter(str(plain), cv2.VideoWriter_fourcc(*"mp4v"), 10, (128, 64))
    for _ in range(5):
        frame = np.zeros((64, 128, 3), np.uint8)
        frame[:, :64] = (0, 0, 255)  # left half red (BGR)
        writer.write(frame)
    writer.release()
    ffmpeg("-display_rotation", "90", "-i", str(plain), "-c", "copy", str(rotated))
    upright = load_video(plain, 64, 1).frames[0].astype(int)
    turned = load_video(rotated, 64, 1).frames[0].astype(int)
    assert upright[:, :24, 0].mean() > 200 and upright[:, 40:, 0].mean() < 50  # red on the left
    # rotated by 90 degrees: red is now on top or at the bottom, not on the left
    top, bottom = turned[:24, :, 0].mean(), turned[40:, :, 0].mean()
    assert max(top, bottom) > 200 and min(top, bottom) < 50


def test_wrong_frame_count_header_is_not_trusted(tmp_path):
    full, cut = tmp_path / "full.mp4", tmp_path / "cut.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x96:rate=25", "-frames:v", "100", "-c:v", "mpeg4", "-q:v", "2",
           "-movflags", "+faststart", str(full))
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])  # header (moov up front) still says 100 frames
    video = load_video(cut, 64, 16)
    assert video.header_frames == 100 and video.total_frames < 100
    assert max(video.sample.indices) < video.total_frames and video.frames.shape[0] == 16


def test_still_image_is_one_frame(tmp_path):
    path = tmp_path / "still.png"
    cv2.imwrite(str(path), np.full((50, 80, 3), 128, np.uint8))
    video = load_video(path, 64, 8)
    assert video.frames.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_text("this is not a video\n" * 50), "not a readable video|no decodable video frames"),
    (lambda p: p.mkdir(), "is a folder"),
])
def test_bad_video_files_are_one_line_errors(tmp_path, make, message):
    path = tmp_path / "clip.mp4"
    make(path)
    with pytest.raises(SfedgeError, match=message) as info:
        load_video(path, 64, 8)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_corrupt_image_is_an_error(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(SfedgeError, match="not a readable image"):
        load_video(path, 64, 8)
