"""Chat about one video: its prefix (decode, encode, project, prefill) is built once, each question
prefills only its own tokens. Interactive by default (/reset, /stats, /save FILE, Ctrl-D to quit);
non-interactive with --question (repeatable) or --questions FILE (one question a line).

    sfedge chat out/tiny_executorch_8da4w --video clip.mp4
    sfedge chat --model tiny --video clip.mp4 --question "What happens?" --question "What colour is it?"
    sfedge chat out/x --video clip.mp4 --cache clip.prefix.safetensors --questions questions.txt
    sfedge chat out/x --camera 0 --duration 10 --question "What is on the table?"
    sfedge chat out/x --video clip.mp4 --realtime --question "What happened last?"   (replayed as a camera would)

Interactive questions follow up on the previous answer (the conversation stays in context) until
/reset; non-interactive questions are independent unless --follow-up. See docs/video_chat.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sfedge.cli.common import add_generation_arguments, add_model_arguments, add_weights_arguments, sampling_config
from sfedge.errors import SfedgeError, UsageError

HELP = "commands: /reset (back to the bare video), /stats (timings of the last answer), /save FILE (the video prefix), Ctrl-D quits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("artifacts", nargs="?", metavar="DIR", help="artifact folder written by `sfedge export`")
    source = parser.add_argument_group("video source (one of)")
    source.add_argument("--video", help="video file (mp4, mkv, avi, webm, mov) or image")
    source.add_argument("--camera", type=int, metavar="N", help="OpenCV camera index: frames are encoded as they arrive")
    source.add_argument("--realtime", action="store_true",
                        help="with --video: replay the file at its own frame rate through the streaming path")
    source.add_argument("--duration", type=float, metavar="S",
                        help="with --camera: questions from --question/--questions are asked after S seconds")
    source.add_argument("--cache", metavar="FILE", help="saved video prefix: used when it exists and matches, written otherwise")
    questions = parser.add_argument_group("questions (default: interactive)")
    questions.add_argument("--question", action="append", default=[], metavar="TEXT", help="ask this (repeatable)")
    questions.add_argument("--questions", metavar="FILE", help="ask each non-empty line of FILE")
    questions.add_argument("--follow-up", action="store_true", help="non-interactive questions follow up on the previous answer")
    parser.add_argument("--backend", help="with DIR: run another backend on it, e.g. eager (the reference model)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifacts")
    parser.add_argument("--threads", type=int, help="CPU threads for the backend")
    parser.add_argument("--max-context", type=int,
                        help="eager model only: KV-cache length (default: the prompt + room for a few turns)")
    add_model_arguments(parser, model_required=False)
    add_weights_arguments(parser)
    add_generation_arguments(parser)


def read_questions(args: argparse.Namespace) -> list:
    questions = list(args.question)
    if args.questions:
        path = Path(args.questions)
        if not path.is_file():
            raise UsageError(f"--questions {path} is not a file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UsageError(f"--questions {path} is not UTF-8 text") from None
        questions += [line.strip() for line in lines if line.strip()]
        if not questions:
            raise UsageError(f"--questions {path} holds no question (one question a line)")
    return questions


def check_source(args: argparse.Namespace) -> None:
    if (args.video is None) == (args.camera is None):
        raise UsageError("pass one video source: --video FILE or --camera N")
    if args.realtime and args.video is None:
        raise UsageError("--realtime replays a --video file (a camera is always real time)")
    if args.duration is not None and (args.camera is None or args.duration <= 0):
        raise UsageError("--duration takes seconds > 0 and applies to --camera")
    if args.cache and (args.camera is not None or args.realtime):
        raise UsageError("--cache saves a video file's prefix; a live stream (--camera, --realtime) has none")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


def build(args: argparse.Namespace):
    from sfedge.cli.run import build_pipeline

    if not args.artifacts and args.model and args.max_context is None:
        from sfedge.budget import DEFAULT_QUESTION, compute_budget, template_text_tokens
        from sfedge.cli.common import model_config

        config = model_config(args)
        budget = compute_budget(config, template_text_tokens(config, DEFAULT_QUESTION, args.llm),
                                max_new_tokens=args.max_new_tokens)
        args.max_context = min(budget.total_tokens + 4 * (args.max_new_tokens + 64), config.llm.max_context)
    args.prompt = "chat"  # build_pipeline's budget reads it only when --max-context is unset
    return build_pipeline(args)


class Conversation:
    """The chat (a video file's or a live stream's) and how one question is printed."""

    def __init__(self, args: argparse.Namespace, pipeline):
        from sfedge.runtime.pipeline import VideoOptions

        self.args = args
        self.sampling = sampling_config(args)
        self.stream = None
        if args.video and not args.realtime:
            options = VideoOptions(policy=args.sampling, sample_fps=args.sample_fps, max_frames=args.frames)
            self.chat = pipeline.open_video(args.video, cache=args.cache, video_options=options)
            print(f"[{pipeline.session.backend}] video prefix ready: {self.chat.prefix_length} tokens | "
                  f"{self.chat.open_stats.summary()}", file=sys.stderr)
        else:
            options = VideoOptions(policy="fps", sample_fps=args.sample_fps, max_frames=args.frames)
            source = args.camera if args.camera is not None else args.video
            self.stream = pipeline.open_stream(source, options, realtime=args.realtime).start()
            self.chat = self.stream.chat
            print(f"[{pipeline.session.backend}] streaming from {'camera ' + str(source) if args.camera is not None else source}: "
                  f"window of {self.stream.window_size} frames at {options.sample_fps:g} fps", file=sys.stderr)

    def wait_for_frames(self) -> None:
        if self.stream is None:
            return
        if self.args.camera is not None:
            deadline = time.monotonic() + (self.args.duration or 0.0)
            while time.monotonic() < deadline and not self.stream.wait(0.1):
                pass
        else:
            self.stream.wait()
        print(f"[stream] {self.stream.frames_seen} frames seen, {self.stream.frames_encoded} encoded, "
              f"window {len(self.stream.window)}/{self.stream.window_size}", file=sys.stderr)

    def ask(self, question: str, follow_up: bool) -> None:
        asker = self.stream if self.stream is not None else self.chat
        for piece in asker.ask(question, follow_up, self.args.max_new_tokens, self.sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        stats = self.chat.last_stats
        print(f"[TTFT {stats.ttft_ms:.0f} ms | prefill {stats.num_prompt_tokens} tok {stats.prefill_ms:.0f} ms | "
              f"decode {stats.num_generated_tokens} tok {stats.decode_tokens_per_s:.1f} tok/s | "
              f"{self.chat.tokens_left} tokens left]", file=sys.stderr)

    def command(self, line: str) -> None:
        name, _, rest = line.partition(" ")
        if name == "/reset":
            self.chat.reset()
            print("[back to the bare video prefix]", file=sys.stderr)
        elif name == "/stats":
            print(self.chat.last_stats.summary(), file=sys.stderr)
        elif name == "/save":
            if not rest.strip():
                raise UsageError("/save takes a file name")
            print(f"[saved {self.chat.save(rest.strip())}]", file=sys.stderr)
        else:
            print(HELP, file=sys.stderr)


def interactive(conversation: Conversation) -> None:
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if not line:
            continue
        try:
            if line.startswith("/"):
                conversation.command(line)
            else:
                conversation.ask(line, follow_up=True)
        except SfedgeError as exc:  # one bad question or command does not end the chat
            print(f"error: {exc}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    check_source(args)
    questions = read_questions(args)
    if args.camera is not None and questions and args.duration is None:
        raise UsageError("with --camera, --question/--questions need --duration S (when to ask)")
    conversation = Conversation(args, build(args))
    if not questions:
        interactive(conversation)
        return 0
    conversation.wait_for_frames()
    for i, question in enumerate(questions):
        print(f"Q{i + 1}: {question}", file=sys.stderr)
        conversation.ask(question, follow_up=args.follow_up and i > 0)
    return 0
