"""Token arithmetic: frames -> slow/fast/visual tokens -> prompt tokens -> KV-cache bytes."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from sfedge.config import ModelConfig
from sfedge.errors import SfedgeError, UsageError

KV_BYTES_PER_VALUE = {"fp32": 4, "fp16": 2, "int8": 1}
DEFAULT_QUESTION = "What happens in the video?"


@dataclass(frozen=True)
class TokenBudget:
    model: str
    slowfast: str
    frames: int
    slow_frames: int
    fast_frames: int
    slow_tokens_per_frame: int
    fast_tokens_per_frame: int
    slow_tokens: int
    fast_tokens: int
    visual_tokens: int
    text_tokens: int
    prompt_tokens: int
    max_new_tokens: int
    total_tokens: int
    context: int
    fits_context: bool
    kv_cache_bytes: dict  # per cache dtype, for total_tokens

    def to_dict(self) -> dict:
        return asdict(self)


def visual_token_counts(config: ModelConfig, frames: Optional[int] = None) -> tuple[int, int, int]:
    """(slow frames, slow tokens, fast tokens) for ``frames`` sampled frames."""
    sf = config.slowfast
    frames = frames or sf.frames
    slow_frames = sf.effective_slow_frames(frames)
    return slow_frames, slow_frames * sf.slow_tokens_per_frame(config.vision.grid), frames * sf.fast_tokens_per_frame()


def compute_budget(config: ModelConfig, text_tokens: int, frames: Optional[int] = None, max_new_tokens: int = 0,
                   context: Optional[int] = None) -> TokenBudget:
    sf = config.slowfast
    frames = frames or sf.frames
    slow_frames, slow_tokens, fast_tokens = visual_token_counts(config, frames)
    visual = slow_tokens + fast_tokens
    prompt = visual + text_tokens
    total = prompt + max_new_tokens
    context = context or config.llm.max_context
    return TokenBudget(
        model=config.name, slowfast=sf.spec, frames=frames, slow_frames=slow_frames, fast_frames=frames,
        slow_tokens_per_frame=sf.slow_tokens_per_frame(config.vision.grid), fast_tokens_per_frame=sf.fast_tokens_per_frame(),
        slow_tokens=slow_tokens, fast_tokens=fast_tokens, visual_tokens=visual, text_tokens=text_tokens,
        prompt_tokens=prompt, max_new_tokens=max_new_tokens, total_tokens=total, context=context,
        fits_context=total <= context,
        kv_cache_bytes={name: total * config.llm.kv_bytes_per_token(b) for name, b in KV_BYTES_PER_VALUE.items()},
    )


def check_prompt_fits(config: ModelConfig, frames: Optional[int], max_context: int, text_tokens: int = 0) -> TokenBudget:
    """The budget of ``frames`` frames plus ``text_tokens`` template text tokens, or an SfedgeError when
    the prompt leaves no room for one new token in ``max_context`` (a UsageError for frames or
    max_context below 1). Pure arithmetic: call it before decoding any frame. ``max_context`` is the
    session's KV-cache length (an export's may differ from the model's)."""
    if frames is not None and frames < 1:
        raise UsageError(f"--frames must be >= 1, got {frames}")
    if max_context < 1:
        raise UsageError(f"--max-context must be >= 1, got {max_context}")
    budget = compute_budget(config, text_tokens, frames=frames, context=max_context)
    if budget.prompt_tokens >= max_context:
        raise SfedgeError(
            f"the prompt needs {budget.prompt_tokens:,} tokens ({budget.visual_tokens:,} visual for {budget.frames:,} frames + "
            f"{text_tokens:,} text) but the context holds {max_context:,}; use fewer frames (--frames), "
            f"a shorter --prompt, a lighter --slowfast spec or a larger --max-context")
    return budget


def template_text_tokens(config: ModelConfig, question: str = DEFAULT_QUESTION, llm_dir: Optional[str] = None) -> int:
    from sfedge.prompt import tokenize_prompt
    from sfedge.tokenizer import load_tokenizer

    return tokenize_prompt(load_tokenizer(config, llm_dir), question, config.prompt_template).text_tokens


def format_budget(budget: TokenBudget) -> str:
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    rows = [
        ("model", budget.model), ("slowfast", budget.slowfast),
        ("frames (fast)", f"{budget.frames}"), ("slow frames", f"{budget.slow_frames}"),
        ("slow tokens", f"{budget.slow_tokens:,} ({budget.slow_frames} x {budget.slow_tokens_per_frame})"),
        ("fast tokens", f"{budget.fast_tokens:,} ({budget.frames} x {budget.fast_tokens_per_frame})"),
        ("visual tokens", f"{budget.visual_tokens:,}"), ("template text tokens", f"{budget.text_tokens:,}"),
        ("prompt tokens", f"{budget.prompt_tokens:,}"), ("+ new tokens", f"{budget.max_new_tokens:,}"),
        ("total tokens", f"{budget.total_tokens:,}"),
        ("KV cache", "  ".join(f"{k} {mib(v)}" for k, v in budget.kv_cache_bytes.items())),
        ("context", f"{budget.context:,}: {'fits' if budget.fits_context else 'DOES NOT FIT'}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
