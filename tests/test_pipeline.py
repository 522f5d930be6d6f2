"""The Python API of README, the tokenizer, splicing, and the eager session contract."""
import torch

from sfedge.config import get_preset
from sfedge.prompt import tokenize_prompt
from sfedge.runtime.generate import prefill
from sfedge.runtime.pipeline import Pipeline, VideoOptions
from sfedge.runtime.sessions.eager import EagerSession
from sfedge.tokenizer import load_tokenizer, train_tiny_tokenizer


def test_readme_python_api(demo_video):
    pipeline = Pipeline.from_preset(get_preset("tiny"), max_context=256)
    text = "".join(pipeline.stream(demo_video, "What happens in the video?", max_new_tokens=5))
    assert isinstance(text, str)
    assert pipeline.last_stats.visual_tokens == 40 and pipeline.last_stats.ttft_ms > 0


def test_tiny_tokenizer_has_qwen_specials_and_is_deterministic():
    config = get_preset("tiny")
    a = load_tokenizer(config)
    b = train_tiny_tokenizer([n for n, _ in config.llm.special_tokens])
    assert a.to_str() == b.to_str()
    assert [a.token_to_id(n) for n, _ in config.llm.special_tokens] == [0, 1, 2]
    assert a.decode(a.encode("a red ball rolls").ids) == "a red ball rolls"


def test_real_qwen_tokenizer_ids_for_true_presets():
    tokenizer = load_tokenizer(get_preset("sf-llava-1.5-1b"))
    assert tokenizer.encode("Hello world, what happens in the video?").ids == [9707, 1879, 11, 1128, 8573, 304, 279, 2766, 30]
    parts = tokenize_prompt(tokenizer, "hi")
    assert parts.before[0] == 151644 and parts.after[-3:] == [151644, 77091, 198]


def test_spliced_embeddings_sit_between_the_prompt_parts(demo_video):
    pipeline = Pipeline.from_preset(get_preset("tiny"), max_context=256)
    embeds = pipeline.prepare(demo_video, "Where is the square?", VideoOptions())
    parts = tokenize_prompt(pipeline.tokenizer, "Where is the square?")
    session = pipeline.session
    assert embeds.shape == (len(parts.before) + 40 + len(parts.after), 64)
    torch.testing.assert_close(embeds[: len(parts.before)], session.embed(torch.tensor(parts.before)))
    torch.testing.assert_close(embeds[-len(parts.after):], session.embed(torch.tensor(parts.after)))


def test_chunked_prefill_equals_one_prefill(tiny_model):
    session = EagerSession(tiny_model)
    embeds = torch.randn(70, 64)
    session.reset()
    whole = prefill(session, embeds)
    session.max_prefill_chunk = 16
    session.reset()
    chunked = prefill(session, embeds)
    session.max_prefill_chunk = session.max_context
    torch.testing.assert_close(whole, chunked, atol=1e-5, rtol=1e-5)


def test_fps_sampling_and_frame_cap(demo_video):
    pipeline = Pipeline.from_preset(get_preset("tiny"), max_context=256)
    list(pipeline.stream(demo_video, "hi", max_new_tokens=1, video=VideoOptions(policy="fps", sample_fps=2.0)))
    assert pipeline.last_stats.frames == 4  # 2 s at 2 fps, under the cap of 8


def test_peak_rss_is_this_process_not_its_parent():
    """A child exec'd from a process with a large peak reports its own, small peak (ru_maxrss would not)."""
    import subprocess
    import sys

    code = ("import subprocess, sys; big = bytearray(600 * 2**20); big[::4096] = b'x' * len(big[::4096]); "
            "print(subprocess.run([sys.executable, '-c', 'from sfedge.runtime.stats import peak_rss_bytes; "
            "print(peak_rss_bytes())'], capture_output=True, text=True, check=True).stdout)")
    child_peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())
    assert child_peak < 400 * 2**20, child_peak
