"""The chat template and the split of a prompt around the <video> placeholder."""
from __future__ import annotations

from dataclasses import dataclass

from sfedge.errors import SfedgeError, UsageError
from sfedge.registry import Registry

VIDEO_PLACEHOLDER = "<video>"

TEMPLATES: Registry[str] = Registry("prompt template")
TEMPLATES.add("qwen-chatml", (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<video>\n{question}<|im_end|>\n<|im_start|>assistant\n"
))


@dataclass(frozen=True)
class PromptParts:
    """Token ids before and after the <video> placeholder."""

    before: list[int]
    after: list[int]

    @property
    def text_tokens(self) -> int:
        return len(self.before) + len(self.after)


def tokenize_prompt(tokenizer, question: str, template: str = "qwen-chatml") -> PromptParts:
    if not question.strip():
        raise UsageError("the prompt is empty; pass a question with --prompt")
    if VIDEO_PLACEHOLDER in question:
        raise UsageError(f"the prompt must not contain {VIDEO_PLACEHOLDER}: the template places the video itself")
    text = TEMPLATES.get(template).format(question=question)
    head, sep, tail = text.partition(VIDEO_PLACEHOLDER)
    if not sep:
        raise SfedgeError(f"prompt template {template!r} has no {VIDEO_PLACEHOLDER} placeholder")
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    return PromptParts(before=encode(head), after=encode(tail))
