"""Video + question -> streamed answer, over any session (eager or an artifact folder).

    pipeline = Pipeline.from_folder("out/tiny_executorch_8da4w")   # or Pipeline.from_preset(get_preset("tiny"))
    for piece in pipeline.stream("clip.mp4", "What happens in the video?"):
        print(piece, end="", flush=True)
    print(pipeline.last_stats.summary())
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from sfedge.config import ModelConfig
from sfedge.errors import SfedgeError
from sfedge.manifest import MANIFEST_FILE, TOKENIZER_FILE, sha256_file
from sfedge.models import WeightsSource
from sfedge.prompt import tokenize_prompt
from sfedge.tokenizer import check_special_tokens, load_tokenizer, load_tokenizer_file
from sfedge.runtime.generate import generate
from sfedge.runtime.sampling import Sampler, SamplingConfig
from sfedge.runtime.sessions import SessionOptions, open_session
from sfedge.runtime.sessions.base import ModelSession
from sfedge.runtime.stats import RunStats, now_ms, peak_rss_bytes
from sfedge.runtime.detokenize import TextStream
from sfedge.runtime.video import IMAGE_SUFFIXES, DecodedVideo, load_video, preprocess, resample_to


@dataclass(frozen=True)
class VideoOptions:
    policy: str = "uniform"  # "uniform" (SF-LLaVA v1) or "fps" (the paper's rule)
    sample_fps: float = 1.0
    max_frames: Optional[int] = None  # default: the artifact's static frame count, or the preset's


class Pipeline:
    def __init__(self, session: ModelSession, tokenizer, load_ms: float = 0.0, fingerprint: Optional[str] = None):
        from sfedge.runtime.prefix_cache import model_fingerprint

        self.session = session
        self.tokenizer = tokenizer
        self.config: ModelConfig = session.config
        self.load_ms = load_ms
        self.last_stats = RunStats()
        self.kv_owner = None  # the VideoChat whose prefix the session's KV cache holds (runtime/chat.py)
        # what a saved video prefix is bound to (runtime/prefix_cache.py)
        self.fingerprint = fingerprint or model_fingerprint(self.config.to_dict(), session.backend, {})

    @classmethod
    def from_folder(cls, folder: str | Path, options: SessionOptions = SessionOptions(), backend: str | None = None) -> "Pipeline":
        from sfedge.runtime.prefix_cache import model_fingerprint

        start = now_ms()
        session = open_session(folder, options, backend)
        tokenizer = load_tokenizer_file(Path(folder) / TOKENIZER_FILE)
        check_special_tokens(tokenizer, session.config, f"{Path(folder) / TOKENIZER_FILE}")
        manifest_sha = sha256_file(Path(folder) / MANIFEST_FILE)
        fingerprint = model_fingerprint(session.config.to_dict(), session.backend, {"manifest_sha256": manifest_sha})
        return cls(session, tokenizer, now_ms() - start, fingerprint)

    @classmethod
    def from_preset(cls, config: ModelConfig, weights: WeightsSource = WeightsSource(), max_context: Optional[int] = None) -> "Pipeline":
        from sfedge.models import resolve_config
        from sfedge.runtime.prefix_cache import model_fingerprint
        from sfedge.runtime.sessions.eager import EagerSession

        start = now_ms()
        config = resolve_config(config, weights)
        session = EagerSession.build(config, weights, max_context)
        fingerprint = model_fingerprint(config.to_dict(), session.backend, {"weights": weights.to_dict()})
        return cls(session, load_tokenizer(config, weights.llm_dir), now_ms() - start, fingerprint)

    def load_for_video(self, video: VideoOptions = VideoOptions()) -> None:
        """Load what a video question runs now (backends that load on first use), counted in ``load_ms``: a
        benchmark's or a run's first time to first token then holds no loading, as on backends that load at open."""
        start = now_ms()
        self.session.load_for_video(self.frames_to_sample(video))
        self.load_ms += now_ms() - start

    # --- stages ---------------------------------------------------------------------------------

    def frames_to_sample(self, video: VideoOptions) -> int:
        """--frames when given (an export must have a projector for it), else the export's or preset's default."""
        if video.max_frames is not None:
            self.session.check_frames(video.max_frames)
            return video.max_frames
        return self.session.frames or self.config.slowfast.frames

    def encode_frames(self, pixels: torch.Tensor, call_ms: Optional[list] = None) -> torch.Tensor:
        """Features [T, patches, width]; ``call_ms`` (the device profiler) receives (frames in the call, ms) per
        encoder call."""
        batch = self.session.encoder_batch
        if not batch:
            start = now_ms()
            features = self.session.encode(pixels)
            if call_ms is not None:
                call_ms.append((pixels.shape[0], now_ms() - start))
            return features
        outputs = []
        for begin in range(0, pixels.shape[0], batch):
            chunk = pixels[begin:begin + batch]
            real = chunk.shape[0]
            if real < batch:  # static batch: pad with zeros, drop the padded outputs
                chunk = torch.cat([chunk, chunk.new_zeros((batch - real, *chunk.shape[1:]))])
            start = now_ms()
            outputs.append(self.session.encode(chunk)[:real])
            if call_ms is not None:
                call_ms.append((batch, now_ms() - start))
        return torch.cat(outputs)

    def check_fits(self, frames: int, text_tokens: int, where: str) -> None:
        """Refuse a prompt that cannot fit the context before any frame is decoded."""
        from sfedge.budget import check_prompt_fits

        try:
            check_prompt_fits(self.config, frames, self.session.max_context, text_tokens=text_tokens)
        except SfedgeError as exc:
            raise type(exc)(f"{where}: {exc}") from None

    def sample_video(self, video_path: str | Path, video: VideoOptions, stats: RunStats) -> DecodedVideo:
        """Decode and sample the frames (exactly the export's count when its projector shapes are static)."""
        frames = self.frames_to_sample(video)
        start = now_ms()
        decoded = load_video(video_path, self.config.vision.frame_size, frames, video.policy, video.sample_fps)
        if self.session.frame_counts:  # static projector shapes: exactly `frames` frames, whatever the policy gave
            sample = resample_to(decoded.sample, frames)
            position = {index: i for i, index in enumerate(decoded.sample.indices)}
            decoded.frames = decoded.frames[[position[i] for i in sample.indices]]
            decoded.sample = sample
        stats.video_decode_ms = now_ms() - start
        stats.frames = len(decoded.sample.indices)
        return decoded

    def encode_video(self, decoded: DecodedVideo, stats: RunStats) -> torch.Tensor:
        """Preprocess and encode sampled frames -> features [T, patches, width]."""
        start = now_ms()
        pixels = preprocess(decoded.frames, self.config.vision.pixel_mean, self.config.vision.pixel_std)
        stats.preprocess_ms = now_ms() - start
        start = now_ms()
        features = self.encode_frames(pixels)
        stats.vision_encode_ms = now_ms() - start
        return features

    def project(self, features: torch.Tensor, stats: RunStats) -> torch.Tensor:
        start = now_ms()
        visual = self.session.project(features)
        stats.projector_ms = now_ms() - start
        stats.visual_tokens = visual.shape[0]
        return visual

    def visual_tokens(self, video_path: str | Path, video: VideoOptions, stats: RunStats, text_tokens: int) -> torch.Tensor:
        """Decode, encode and project a video -> visual embeddings [visual tokens, hidden]."""
        frames = self.frames_to_sample(video)
        if video.policy == "uniform" or self.session.frame_counts:  # the frame count is known before decoding
            if Path(video_path).suffix.lower() not in IMAGE_SUFFIXES:
                self.check_fits(frames, text_tokens, str(video_path))
        decoded = self.sample_video(video_path, video, stats)
        return self.project(self.encode_video(decoded, stats), stats)

    def prepare(self, video_path: str | Path, question: str, video: VideoOptions = VideoOptions(),
                stats: Optional[RunStats] = None) -> torch.Tensor:
        """Everything before prefill: the spliced prompt embeddings [L, hidden]."""
        stats = stats or RunStats()
        parts = tokenize_prompt(self.tokenizer, question, self.config.prompt_template)
        visual = self.visual_tokens(video_path, video, stats, parts.text_tokens)
        start = now_ms()
        stats.token_encode_end_ms = now_ms()
        before = self.session.embed(torch.tensor(parts.before, dtype=torch.long))
        after = self.session.embed(torch.tensor(parts.after, dtype=torch.long))
        stats.embed_ms = now_ms() - start
        embeds = torch.cat([before, visual.to(before.dtype), after])
        if embeds.shape[0] >= self.session.max_context:
            raise SfedgeError(
                f"{video_path}: the prompt needs {embeds.shape[0]} tokens ({stats.visual_tokens} visual + "
                f"{parts.text_tokens} text) but the context holds {self.session.max_context}; use fewer frames "
                f"(--frames), a lighter --slowfast spec, or export with a larger --max-context")
        return embeds

    def stream(self, video_path: str | Path, question: str, max_new_tokens: int = 64,
               sampling: SamplingConfig = SamplingConfig(), video: VideoOptions = VideoOptions()) -> Iterator[str]:
        """Yield answer text as it is generated; timings land in ``self.last_stats``."""
        stats = RunStats(model_load_end_ms=self.load_ms)
        self.last_stats = stats
        stats.inference_start_ms = now_ms()
        embeds = self.prepare(video_path, question, video, stats)
        self.kv_owner = None  # generate() starts the cache over
        tokens = generate(self.session, embeds, Sampler(sampling), max_new_tokens, self.config.llm.eos_ids, stats)
        yield from TextStream(self.tokenizer).pieces(tokens)
        finish_stats(stats)

    # --- video chat: one video, many questions (runtime/chat.py) -----------------------------------

    def open_video(self, video, cache: Optional[str | Path] = None, video_options: VideoOptions = VideoOptions()):
        """Decode, encode, project and prefill a video's prefix once; ``chat.ask(question)`` then prefills only
        the question. ``video`` is a file path; ``cache`` a file written by ``chat.save`` (checked against it)."""
        from sfedge.runtime.chat import open_video

        return open_video(self, video, cache, video_options)

    def open_stream(self, frames, video_options: Optional[VideoOptions] = None, **kwargs):
        """Frames as they arrive (runtime/stream.py): each sampled frame is encoded on arrival into a bounded window
        (default policy: fps, one frame per 1/sample_fps seconds, the window holding the frame budget)."""
        from sfedge.runtime.stream import open_stream

        return open_stream(self, frames, video_options or VideoOptions(policy="fps"), **kwargs)

    def answer(self, video_path: str | Path, question: str, **kwargs) -> str:
        return "".join(self.stream(video_path, question, **kwargs))


def finish_stats(stats: RunStats) -> None:
    """Make timestamps relative to the start, as ExecuTorch's observer reports them."""
    origin = stats.inference_start_ms
    for name in ("token_encode_end_ms", "prompt_eval_end_ms", "first_token_ms", "inference_end_ms"):
        setattr(stats, name, max(getattr(stats, name) - origin, 0.0))
    stats.inference_start_ms = 0.0
    stats.peak_rss_bytes = peak_rss_bytes()
