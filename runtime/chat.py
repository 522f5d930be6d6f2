"""Video chat: prefill a video's prefix once, then answer many questions about it.

    chat = pipeline.open_video("clip.mp4")          # decode, encode, project, prefill the prefix once
    for piece in chat.ask("What happens?"): ...       # only the question's tokens are prefilled
    for piece in chat.ask("What colour is it?"): ...  # rewinds the KV cache to the end of the prefix
    chat.ask("And then?", follow_up=True)             # keeps the previous question and answer in context
    chat.save("clip.prefix.safetensors")              # runtime/prefix_cache.py

The prompt is the single-shot one (sfedge/prompt.py): ``before`` (system turn + user turn start) and
the visual tokens form the prefix; the question's tokens (``after``: the newline that follows
<video>, the question, the assistant turn start) come next. The token sequence of a first question
is exactly the single-shot prompt, so reuse changes no answer. The chat remembers which token ids
its KV cache holds after the prefix and re-feeds only from the first id that differs (at least
one, for the logits): sessions address KV positions, so decoding at position p discards what was
cached at p and after.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, List, Optional, Sequence

import torch

from sfedge.errors import SfedgeError, UsageError
from sfedge.prompt import tokenize_prompt
from sfedge.registry import Registry
from sfedge.runtime.detokenize import TextStream
from sfedge.runtime.generate import decode_tokens, prefill
from sfedge.runtime.sampling import Sampler, SamplingConfig
from sfedge.runtime.stats import RunStats, now_ms

if TYPE_CHECKING:  # pragma: no cover
    from sfedge.runtime.pipeline import Pipeline, VideoOptions

# template -> the text that closes an assistant answer and opens the next user turn
FOLLOW_UP_TEMPLATES: Registry[str] = Registry("follow-up template")
FOLLOW_UP_TEMPLATES.add("qwen-chatml", "<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class VideoChat:
    """One video's prefix in the session's KV cache, and the conversation after it."""

    def __init__(self, pipeline: "Pipeline", visual: Optional[torch.Tensor] = None, open_stats: Optional[RunStats] = None):
        self.pipeline = pipeline
        self.session = pipeline.session
        self.tokenizer = pipeline.tokenizer
        self.template = pipeline.config.prompt_template
        self.before: List[int] = tokenize_prompt(self.tokenizer, "question", self.template).before
        self.open_stats = open_stats or RunStats()
        self.visual: Optional[torch.Tensor] = None
        self.prefix_length = 0
        self.conversation: List[int] = []  # token ids after the prefix: turns and answers, in order
        self.cached: List[int] = []  # the ids whose keys/values the KV cache holds after the prefix
        self.last_stats = RunStats()
        self.question_stats: List[RunStats] = []
        self.reused_tokens: List[int] = []  # per question: tokens after the prefix that were not re-fed
        self.last_answer_ids: List[int] = []  # the token ids of the last answer
        self.last_logits: Optional[torch.Tensor] = None  # the logits the last question's first token came from
        self._source = None  # (video sha256, VideoOptions, frames) when opened from a file: binds chat.save
        if visual is not None:
            self.set_visual(visual)

    # --- the prefix ---------------------------------------------------------------------------------

    def set_visual(self, visual: torch.Tensor, kv: Optional[dict] = None) -> float:
        """Make ``visual`` the prefix (prefilled, or loaded from a saved KV cache); returns the prefill ms."""
        self.visual = visual
        self.prefix_length = len(self.before) + visual.shape[0]
        if self.prefix_length >= self.session.max_context:
            raise SfedgeError(f"the video prefix needs {self.prefix_length} tokens ({visual.shape[0]} visual) but the "
                              f"context holds {self.session.max_context}; use fewer frames or a larger --max-context")
        self.conversation = []
        return self._fill_prefix(kv)

    def _fill_prefix(self, kv: Optional[dict] = None) -> float:
        """Write the prefix into the session's KV cache and take ownership of it (another chat on the same
        pipeline, or a single-shot ``Pipeline.stream``, may have overwritten it since)."""
        start = now_ms()
        if kv is not None:
            self.session.load_kv(kv, self.prefix_length)
        else:
            self.session.reset()
            before = self.session.embed(torch.tensor(self.before, dtype=torch.long))
            prefill(self.session, torch.cat([before, self.visual.to(before.dtype)]))
        self.cached = []
        self.pipeline.kv_owner = self
        return now_ms() - start

    def reset(self) -> None:
        """Back to the bare video prefix (the cache beyond it is overwritten by the next question)."""
        self.conversation = []

    @property
    def tokens_left(self) -> int:
        return self.session.max_context - self.prefix_length - len(self.conversation)

    # --- questions ----------------------------------------------------------------------------------

    def turn_ids(self, question: str, follow_up: bool) -> List[int]:
        parts = tokenize_prompt(self.tokenizer, question, self.template)  # validates the question
        if not follow_up or not self.conversation:
            return parts.after
        text = FOLLOW_UP_TEMPLATES.get(self.template).format(question=question)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def ask(self, question: str, follow_up: bool = False, max_new_tokens: int = 64,
            sampling: SamplingConfig = SamplingConfig(), clock_start: Optional[float] = None,
            eos_ids: Optional[Sequence[int]] = None) -> Iterator[str]:
        """Yield the answer's text; ``self.last_stats`` holds this question's timings (TTFT from the call, or
        from ``clock_start``, a now_ms() value, when given). ``eos_ids``: default the model's (the benchmark
        passes () to decode a fixed number of tokens)."""
        if self.visual is None:
            raise SfedgeError("no video prefix yet: no frame has been encoded")
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stats = RunStats(frames=self.open_stats.frames, visual_tokens=self.visual.shape[0])
        self.last_stats = stats
        stats.inference_start_ms = clock_start if clock_start is not None else now_ms()
        turn = self.turn_ids(question, follow_up)
        history = self.conversation if follow_up else []
        left = self.session.max_context - self.prefix_length - len(history)
        if len(turn) + 1 > left:
            what = "the follow-up" if history else "the question"
            raise SfedgeError(f"{what} needs {len(turn) + 1} tokens (its {len(turn)} + 1 to answer) but only {left} of the "
                              f"{self.session.max_context}-token context are left after the video prefix ({self.prefix_length})"
                              + (f" and the conversation ({len(history)})" if history else "")
                              + ("; call reset() (/reset) or ask without follow-up" if history else "; use fewer frames"))
        target = history + turn
        if self.pipeline.kv_owner is not self:  # the session's cache holds another conversation: refill the prefix
            stats.prefill_ms += self._fill_prefix()
        reuse = min(common_prefix(self.cached, target), len(target) - 1)
        stats.token_encode_end_ms = now_ms()
        start = now_ms()
        embeds = self.session.embed(torch.tensor(target[reuse:], dtype=torch.long))
        stats.embed_ms = now_ms() - start
        start = now_ms()
        self.cached = list(target[:reuse])  # the cache beyond is about to be overwritten
        logits = prefill(self.session, embeds, self.prefix_length + reuse)
        self.last_logits = logits
        self.cached = list(target)
        stats.prefill_ms += now_ms() - start
        stats.prompt_eval_end_ms = now_ms()
        stats.num_prompt_tokens = len(target) - reuse
        self.reused_tokens.append(reuse)
        self.question_stats.append(stats)
        self.conversation = list(target)
        self.last_answer_ids: List[int] = []
        position = self.prefix_length + len(target)
        tokens = decode_tokens(self.session, logits, position, Sampler(sampling), max_new_tokens,
                               self.pipeline.config.llm.eos_ids if eos_ids is None else eos_ids, stats, fed=self.cached)
        yield from TextStream(self.tokenizer).pieces(self._recorded(tokens))
        from sfedge.runtime.pipeline import finish_stats

        finish_stats(stats)

    def _recorded(self, tokens: Iterable[int]) -> Iterator[int]:
        """Pass the generated tokens on, keeping them in the conversation and the last answer."""
        for token in tokens:
            self.conversation.append(token)
            self.last_answer_ids.append(token)
            yield token

    def answer(self, question: str, **kwargs) -> str:
        return "".join(self.ask(question, **kwargs))

    # --- saved prefix ---------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the projected visual tokens and (where the backend exposes it) the prefix's KV cache."""
        from sfedge.runtime.prefix_cache import save_prefix

        if self._source is None:
            raise SfedgeError("this chat has no video file to bind a saved prefix to (a live stream's window changes); "
                              "open a video file with pipeline.open_video to save its prefix")
        return save_prefix(self, Path(path))


def open_video(pipeline: "Pipeline", video, cache: Optional[str | Path], options: "VideoOptions") -> VideoChat:
    """Decode, encode, project and prefill ``video``'s prefix (or take them from ``cache`` when it exists and
    matches; a missing ``cache`` file is written after the prefix is built)."""
    from sfedge.runtime.prefix_cache import PrefixKey, load_prefix

    video = Path(video)
    stats = RunStats(model_load_end_ms=pipeline.load_ms)
    stats.inference_start_ms = now_ms()
    key = PrefixKey.for_video(pipeline, video, options)
    chat = VideoChat(pipeline, open_stats=stats)
    chat._source = key
    if cache is not None and Path(cache).exists():
        visual, kv = load_prefix(Path(cache), key, chat.before)
        stats.frames, stats.visual_tokens = key.frames, visual.shape[0]
        stats.prefill_ms = chat.set_visual(visual, kv)
    else:
        text_tokens = tokenize_prompt(pipeline.tokenizer, "question", chat.template).text_tokens
        visual = pipeline.visual_tokens(video, options, stats, text_tokens)
        stats.prefill_ms = chat.set_visual(visual)
        if cache is not None:
            chat.save(cache)
    stats.num_prompt_tokens = chat.prefix_length
    stats.prompt_eval_end_ms = stats.first_token_ms = stats.inference_end_ms = now_ms()
    from sfedge.runtime.pipeline import finish_stats

    finish_stats(stats)  # its "TTFT" is the time until the prefix is ready
    return chat
