"""Video-chat benchmark cases (``sfedge bench --questions N`` / ``--realtime``), run by the worker.

``--questions N``: each repetition opens the video once (decode, encode, project, prefix prefill)
and asks N different questions. Question 1's TTFT counts the opening (it is what a single-shot run
pays); questions 2..N pay only their own prefill. The record keeps the usual metrics (of question 1,
so the gate and the tables compare like with like) plus ``q{n}_ttft_ms``, ``q{n}_prefill_ms``,
``q{n}_prompt_tokens`` and ``q{n}_decode_tokens_per_s``.

``--realtime``: the clip is replayed at its own frame rate through ``pipeline.open_stream`` (fps
policy with sample_fps = frames / clip duration, so the window ends up holding ``frames`` frames),
each kept frame encoded on arrival; when the last frame has been delivered and encoded the question
is asked. ``ttft_ms`` is measured from that question (projector + prefill + first token);
``rt_lag_ms`` is the time from the last frame's arrival to the question (its encode, if it was kept).
"""
from __future__ import annotations

import time

from sfedge.errors import SfedgeError
from sfedge.runtime.stats import RunStats, now_ms

QUESTIONS = ("What happens in the video?", "What colour is the moving square?", "Where does it go?",
             "Is there a person?", "How fast does it move?", "What is in the background?")


def question_list(count: int, filler=None) -> list:
    if filler is not None:  # --prompt-tokens: the same-length filler, varied by its first word so each is new
        return [f"{i} {filler}" for i in range(count)]
    return [QUESTIONS[i % len(QUESTIONS)] + (f" ({i // len(QUESTIONS) + 1})" if i >= len(QUESTIONS) else "")
            for i in range(count)]


def _stage_sample(open_stats: RunStats, first: RunStats, ttft: float) -> dict:
    """The usual per-rep sample, of question 1 with the opening included."""
    steps = max(first.num_generated_tokens - 1, 1)
    sample = {
        "video_decode_ms": open_stats.video_decode_ms, "preprocess_ms": open_stats.preprocess_ms,
        "vision_encode_ms": open_stats.vision_encode_ms,
        "vision_encode_ms_per_frame": open_stats.vision_encode_ms / max(open_stats.frames, 1),
        "projector_ms": open_stats.projector_ms, "embed_ms": first.embed_ms,
        "prefill_ms": open_stats.prefill_ms + first.prefill_ms, "first_token_ms": ttft, "ttft_ms": ttft,
        "decode_ms": first.decode_ms, "aggregate_sampling_time_ms": first.aggregate_sampling_time_ms,
        "decode_tokens_per_s": first.decode_tokens_per_s, "decode_ms_per_token": first.decode_ms / steps,
    }
    prompt = open_stats.num_prompt_tokens + first.num_prompt_tokens
    sample["prefill_tokens_per_s"] = prompt / (sample["prefill_ms"] / 1e3) if sample["prefill_ms"] else 0.0
    sample["ttft_other_ms"] = ttft - sum(sample[k] for k in ("video_decode_ms", "preprocess_ms", "vision_encode_ms",
                                                             "projector_ms", "embed_ms", "prefill_ms"))
    return sample


def questions_rep(case, pipeline, questions: list, log) -> tuple:
    from sfedge.runtime.pipeline import VideoOptions

    start = now_ms()
    chat = pipeline.open_video(case.video, video_options=VideoOptions(max_frames=case.frames))
    open_ms = now_ms() - start
    sample: dict = {}
    asked = []
    for i, question in enumerate(questions, 1):
        for _ in chat.ask(question, max_new_tokens=case.gen_tokens, eos_ids=()):
            pass
        stats = chat.last_stats
        ttft = stats.ttft_ms + (open_ms if i == 1 else 0.0)
        sample.update({f"q{i}_ttft_ms": ttft, f"q{i}_prefill_ms": stats.prefill_ms,
                       f"q{i}_prompt_tokens": stats.num_prompt_tokens,
                       f"q{i}_decode_tokens_per_s": stats.decode_tokens_per_s})
        asked.append(stats)
    first = asked[0]
    sample.update(_stage_sample(chat.open_stats, first, sample["q1_ttft_ms"]))
    sample["prompt_eval_end_ms"] = open_ms + first.prompt_eval_end_ms
    sample["inference_end_ms"] = open_ms + first.inference_end_ms
    constants = {"frames": chat.open_stats.frames, "visual_tokens": chat.visual.shape[0],
                 "text_tokens": len(chat.before) + first.num_prompt_tokens,
                 "num_prompt_tokens": chat.prefix_length + first.num_prompt_tokens,
                 "num_generated_tokens": first.num_generated_tokens}
    log("      " + ", ".join(f"Q{i} TTFT {sample[f'q{i}_ttft_ms']:.1f} ms" for i in range(1, len(questions) + 1)))
    return sample, constants


def clip_seconds(path: str) -> float:
    import cv2

    capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    frames, fps = capture.get(cv2.CAP_PROP_FRAME_COUNT), capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    if not frames or not fps:
        raise SfedgeError(f"{path}: --realtime needs a video with a frame rate and frame count")
    return frames / fps


def realtime_rep(case, pipeline, question: str, log) -> tuple:
    from sfedge.runtime.pipeline import VideoOptions

    frames = pipeline.frames_to_sample(VideoOptions(max_frames=case.frames))
    options = VideoOptions(policy="fps", sample_fps=frames / clip_seconds(case.video), max_frames=frames)
    stream = pipeline.open_stream(case.video, options, realtime=True)
    replay_start = time.monotonic()
    stream.run()  # delivers frames at the clip's own rate, encoding each kept one on arrival
    lag = now_ms() - stream.last_frame_ms
    for _ in stream.ask(question, max_new_tokens=case.gen_tokens, eos_ids=()):
        pass
    stats = stream.chat.last_stats
    open_stats = RunStats(frames=len(stream.window), vision_encode_ms=stream.encode_ms, projector_ms=stats.projector_ms,
                          num_prompt_tokens=stream.chat.prefix_length)
    sample = _stage_sample(open_stats, stats, stats.ttft_ms)
    sample["vision_encode_ms_per_frame"] = stream.encode_ms / max(stream.frames_encoded, 1)
    sample.update({"rt_lag_ms": lag, "rt_replay_s": time.monotonic() - replay_start,
                   "rt_frames_seen": stream.frames_seen, "rt_frames_encoded": stream.frames_encoded,
                   "prompt_eval_end_ms": stats.prompt_eval_end_ms, "inference_end_ms": stats.inference_end_ms})
    constants = {"frames": len(stream.window), "visual_tokens": stream.chat.visual.shape[0],
                 "text_tokens": len(stream.chat.before) + stats.num_prompt_tokens,
                 "num_prompt_tokens": stream.chat.prefix_length + stats.num_prompt_tokens,
                 "num_generated_tokens": stats.num_generated_tokens}
    log(f"      realtime: {stream.frames_seen} frames in {sample['rt_replay_s']:.1f} s, {stream.frames_encoded} encoded; "
        f"TTFT after the last frame {stats.ttft_ms:.1f} ms (projector {stats.projector_ms:.1f} + prefill {stats.prefill_ms:.1f})")
    return sample, constants


def run_chat_rep(case, pipeline, question: str, log) -> tuple:
    """One repetition of a chat case: (sample, constants)."""
    if case.realtime:
        return realtime_rep(case, pipeline, question, log)
    from sfedge.budget import DEFAULT_QUESTION

    filler = None if question == DEFAULT_QUESTION else question
    return questions_rep(case, pipeline, question_list(case.questions, filler), log)
