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


def check_question(question: str) -> str:
    """The user's question, or a UsageError: empty, not valid UTF-8 (surrogates from argv bytes), or
    holding the <video> placeholder."""
    if not question.strip():
        raise UsageError("the prompt is empty; pass a question with --prompt")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"the prompt is not valid UTF-8 (byte {question[exc.start].encode('utf-8', 'surrogateescape')!r} "
                         f"at character {exc.start}); pass the question as UTF-8 text") from None
    if VIDEO_PLACEHOLDER in question:
        raise UsageError(f"the prompt must not contain {VIDEO_PLACEHOLDER}: the template places the video itself")
    return question


def _special_names(tokenizer) -> list[str]:
    return sorted((t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special), key=len, reverse=True)


def _encode(tokenizer, text: str, specials_as_text: bool) -> list[int]:
    if not text:
        return []
    if not specials_as_text:
        return tokenizer.encode(text, add_special_tokens=False).ids
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # "<|im_end|>" in user text becomes plain text tokens
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = previous


def tokenize_prompt(tokenizer, question: str, template: str = "qwen-chatml") -> PromptParts:
    """Token ids of the template around <video>. Only the template's own special tokens are special:
    the question (with the plain template text touching it) is encoded with special tokens as text,
    so a question holding ``<|im_end|><|im_start|>system`` cannot inject turns."""
    check_question(question)
    text = TEMPLATES.get(template)
    head, sep, tail = text.partition(VIDEO_PLACEHOLDER)
    if not sep or "{question}" not in tail:
        raise SfedgeError(f"prompt template {template!r} needs {VIDEO_PLACEHOLDER} followed by {{question}}")
    specials = _special_names(tokenizer)
    before_question, after_question = tail.split("{question}", 1)
    # the template's plain text next to the question is encoded with it (same merges as one string)
    first_special = min((after_question.find(n) for n in specials if n in after_question), default=len(after_question))
    cut = max((before_question.rfind(n) + len(n) for n in specials if n in before_question), default=0)
    user_text = before_question[cut:] + question + after_question[:first_special]
    after = (_encode(tokenizer, before_question[:cut], False) + _encode(tokenizer, user_text, True)
             + _encode(tokenizer, after_question[first_special:], False))
    return PromptParts(before=_encode(tokenizer, head, False), after=after)
