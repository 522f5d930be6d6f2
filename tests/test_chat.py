"""Video chat on the eager tiny model: prefix reuse changes no answer, multi-turn history, the
context-full error, saved prefixes (round trip, stale ones refused), streaming with a bounded
window, the UTF-8 flush of the streamed text, and `sfedge chat` / `sfedge bench --questions`."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sfedge.cli import main
from sfedge.config import get_preset
from sfedge.errors import SfedgeError
from sfedge.models import WeightsSource
from sfedge.prompt import tokenize_prompt
from sfedge.runtime.detokenize import TextStream
from sfedge.runtime.generate import generate
from sfedge.runtime.pipeline import Pipeline, VideoOptions
from sfedge.runtime.sampling import Sampler, SamplingConfig
from sfedge.runtime.stream import Frame
from sfedge.runtime.video import make_demo_video

LONG_Q = "What happens in the video? Describe every object, its colour and where it moves, from the first frame to the last."
SHORT_Q = "Where is the square?"
SAMPLED = SamplingConfig(temperature=2.0, seed=3)  # the tiny random model's greedy answer repeats one token
CONTEXT = 320


def fresh(seed: int = 0, max_context: int = CONTEXT) -> Pipeline:
    return Pipeline.from_preset(get_preset("tiny"), WeightsSource(seed=seed), max_context=max_context)


def ask(chat, question, **kwargs):
    text = "".join(chat.ask(question, max_new_tokens=kwargs.pop("max_new_tokens", 8), **kwargs))
    return text, list(chat.last_answer_ids), chat.last_logits.clone()


@pytest.fixture(scope="module")
def pipeline():
    return fresh()


def test_reuse_changes_no_answer(pipeline, demo_video):
    """Question 2 (shorter than question 1, so stale keys/values would sit past its end) after
    question 1 gives the ids and logits of question 2 alone on a freshly opened pipeline, and of the
    single-shot prompt."""
    chat = pipeline.open_video(demo_video)
    ask(chat, LONG_Q, sampling=SAMPLED)
    _, greedy_after, logits_after = ask(chat, SHORT_Q)
    _, sampled_after, _ = ask(chat, SHORT_Q, sampling=SAMPLED)
    assert chat.reused_tokens[1] < len(tokenize_prompt(pipeline.tokenizer, SHORT_Q).after)

    alone = fresh().open_video(demo_video)
    _, greedy_alone, logits_alone = ask(alone, SHORT_Q)
    _, sampled_alone, _ = ask(alone, SHORT_Q, sampling=SAMPLED)
    assert greedy_after == greedy_alone and sampled_after == sampled_alone
    torch.testing.assert_close(logits_after, logits_alone, atol=1e-5, rtol=1e-5)

    single = fresh()
    embeds = single.prepare(demo_video, SHORT_Q)
    single_ids = list(generate(single.session, embeds, Sampler(SamplingConfig()), 8, single.config.llm.eos_ids))
    assert single_ids == greedy_after
    assert len(set(sampled_after)) > 1  # the sampled answer is not one repeated token: it can tell caches apart


def test_context_matters_so_the_reuse_test_can_fail(pipeline, demo_video):
    chat = pipeline.open_video(demo_video)
    _, _, alone = ask(chat, SHORT_Q)
    ask(chat, LONG_Q)
    _, _, with_history = ask(chat, SHORT_Q, follow_up=True)
    assert not torch.allclose(alone, with_history, atol=1e-3)


def test_follow_up_keeps_the_conversation(pipeline, demo_video):
    chat = pipeline.open_video(demo_video)
    ask(chat, LONG_Q, sampling=SAMPLED)
    first_turn = list(chat.conversation)
    _, follow_ids, follow_logits = ask(chat, "And then?", follow_up=True, sampling=SamplingConfig())
    template = "<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n"
    expected = first_turn + pipeline.tokenizer.encode(template, add_special_tokens=False).ids
    assert chat.conversation[:len(expected)] == expected
    assert chat.reused_tokens[-1] == len(first_turn) - 1  # only the last answer token (never fed) is re-fed

    # the same conversation prefilled in one go on a fresh model
    single = fresh()
    session = single.session
    before = session.embed(torch.tensor(chat.before))
    embeds = torch.cat([before, chat.visual, session.embed(torch.tensor(expected))])
    ids = list(generate(session, embeds, Sampler(SamplingConfig()), 8, single.config.llm.eos_ids))
    assert ids == follow_ids
    session.reset()
    from sfedge.runtime.generate import prefill

    torch.testing.assert_close(prefill(session, embeds), follow_logits, atol=1e-4, rtol=1e-4)

    chat.reset()
    assert chat.conversation == [] and chat.tokens_left == CONTEXT - chat.prefix_length


def test_follow_up_that_does_not_fit_says_how_many_tokens_are_left(demo_video):
    chat = fresh(max_context=150).open_video(demo_video)
    ask(chat, SHORT_Q, max_new_tokens=20)
    with pytest.raises(SfedgeError) as error:
        for _ in range(10):
            ask(chat, LONG_Q, follow_up=True, max_new_tokens=20)
    message = str(error.value)
    assert "\n" not in message
    assert re.search(r"needs \d+ tokens .* only \d+ of the 150-token context are left", message)
    chat.reset()
    ask(chat, SHORT_Q)  # back at the bare prefix it fits again


def test_saved_prefix_round_trips_and_skips_the_video(pipeline, demo_video, tmp_path, monkeypatch):
    chat = pipeline.open_video(demo_video)
    _, ids, logits = ask(chat, SHORT_Q)
    path = chat.save(tmp_path / "clip.prefix.safetensors")
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    with safe_open(str(path), framework="pt") as handle:
        header, names = handle.metadata(), set(handle.keys())
    assert header["frames"] == "8" and header["has_kv"] == "1" and len(header["video_sha256"]) == 64
    assert {"visual", "prefix_ids", "kv.layer0.key", "kv.layer1.value"} <= names

    reopened = fresh()
    monkeypatch.setattr(Pipeline, "visual_tokens", lambda *a, **k: pytest.fail("the saved prefix was not used"))
    cached = reopened.open_video(demo_video, cache=path)
    _, cached_ids, cached_logits = ask(cached, SHORT_Q)
    assert cached_ids == ids
    torch.testing.assert_close(cached_logits, logits, atol=1e-5, rtol=1e-5)

    # without a KV cache (ExecuTorch cannot expose it) the prefix is re-prefilled from the saved visual tokens
    monkeypatch.setattr(type(reopened.session), "save_kv", lambda self, length: None)
    no_kv = cached.save(tmp_path / "no_kv.safetensors")
    again = fresh().open_video(demo_video, cache=no_kv)
    assert ask(again, SHORT_Q)[1] == ids


def test_a_stale_prefix_is_refused_naming_the_mismatch(pipeline, demo_video, tmp_path):
    path = pipeline.open_video(demo_video).save(tmp_path / "clip.prefix.safetensors")
    other_video = make_demo_video(tmp_path / "other.mp4", seconds=1.5, fps=12, size=96)
    cases = [
        (lambda: pipeline.open_video(other_video, cache=path), "another video"),
        (lambda: pipeline.open_video(demo_video, cache=path, video_options=VideoOptions(max_frames=4)), "another frame count"),
        (lambda: fresh(seed=1).open_video(demo_video, cache=path), "another export/model"),
        (lambda: pipeline.open_video(demo_video, cache=path, video_options=VideoOptions(policy="fps")), "another sampling policy"),
    ]
    for opener, mismatch in cases:
        with pytest.raises(SfedgeError, match=f"stale video prefix: saved for {mismatch}") as error:
            opener()
        assert "\n" not in str(error.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SfedgeError, match="not a readable safetensors file"):
        pipeline.open_video(demo_video, cache=tmp_path / "junk.safetensors")


def test_a_stream_longer_than_the_window_keeps_memory_flat(pipeline):
    def frames(count):
        for i in range(count):
            yield Frame(np.full((72, 96, 3), (i * 7) % 255, np.uint8), i * 0.25)

    stream = pipeline.open_stream(frames(120), VideoOptions(policy="fps", sample_fps=2.0))
    sizes = []
    for frame in stream.frames:
        stream.push(frame)
        sizes.append(sum(f.nbytes for _, f in stream.window))
    assert stream.frames_seen == 120 and stream.frames_encoded == 60  # every other frame at 2 fps over 4 fps
    assert stream.window_size == 8 and len(stream.window) == 8 and stream.window.maxlen == 8
    assert max(sizes) == sizes[-1] == sizes[20]  # the window's memory stops growing once full
    assert [t for t, _ in stream.window] == [26.0 + 0.5 * i for i in range(8)]  # the last 8 kept frames
    text = "".join(stream.ask(SHORT_Q, max_new_tokens=4))
    assert isinstance(text, str) and stream.chat.last_stats.projector_ms > 0
    assert stream.chat.last_stats.ttft_ms >= stream.chat.last_stats.prefill_ms


def test_a_stream_answers_like_the_same_frames_offline(pipeline, demo_video):
    """The window's visual tokens are the offline path's for the same frames."""
    from sfedge.runtime.stats import RunStats

    decoded = pipeline.sample_video(demo_video, VideoOptions(), RunStats())
    stream = pipeline.open_stream(iter([Frame(f, float(t)) for f, t in zip(decoded.frames, decoded.sample.timestamps)]),
                                  VideoOptions(policy="fps", sample_fps=1000.0))
    stream.start()
    assert stream.wait(60)
    "".join(stream.ask(SHORT_Q, max_new_tokens=8))
    ids, logits = stream.chat.last_answer_ids, stream.chat.last_logits
    offline = pipeline.open_video(demo_video)
    _, offline_ids, offline_logits = ask(offline, SHORT_Q)
    assert ids == offline_ids
    torch.testing.assert_close(logits, offline_logits, atol=1e-4, rtol=1e-4)


def test_streamed_text_flushes_a_trailing_incomplete_character(pipeline, demo_video, monkeypatch):
    tokenizer = pipeline.tokenizer
    ids = tokenizer.encode("ab é", add_special_tokens=False).ids
    assert tokenizer.decode(ids[:-1]).endswith("\ufffd")  # é is two byte tokens in the tiny tokenizer
    text = TextStream(tokenizer)
    assert "".join(text.push(i) for i in ids[:-1]) == "ab "
    assert text.flush() == "\ufffd"
    # through Pipeline.stream: the answer ends mid-character and the end is still delivered
    monkeypatch.setattr("sfedge.runtime.pipeline.generate", lambda *a, **k: iter(ids[:-1]))
    assert "".join(pipeline.stream(demo_video, SHORT_Q)) == tokenizer.decode(ids[:-1])


def test_the_budget_is_checked_before_any_frame_is_decoded(demo_video, monkeypatch):
    small = fresh(max_context=48)
    monkeypatch.setattr("sfedge.runtime.pipeline.load_video", lambda *a, **k: pytest.fail("decoded before the budget check"))
    with pytest.raises(SfedgeError, match="the prompt needs .* but the context holds 48"):
        small.prepare(demo_video, SHORT_Q)
    with pytest.raises(SfedgeError, match="context holds 48"):
        small.open_video(demo_video)


def test_cli_chat_with_questions_file(demo_video, tmp_path, capsys):
    questions = tmp_path / "questions.txt"
    questions.write_text(f"{LONG_Q}\n\n{SHORT_Q}\n")
    cache = tmp_path / "demo.prefix.safetensors"
    args = ["chat", "--model", "tiny", "--video", str(demo_video), "--questions", str(questions),
            "--max-new-tokens", "3", "--cache", str(cache)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "Q1: " + LONG_Q in err and "Q2: " + SHORT_Q in err and len(re.findall(r"\[TTFT \d+ ms", err)) == 2
    assert cache.exists()
    assert main(args + ["--frames", "4"]) == 1
    assert "stale video prefix: saved for another frame count" in capsys.readouterr().err
    assert main(["chat", "--model", "tiny", "--video", str(demo_video), "--questions", str(tmp_path / "none.txt")]) == 2
    assert main(["chat", "--model", "tiny", "--question", "hi"]) == 2  # no video source


def test_bench_questions_reports_ttft_per_question(demo_video):
    from sfedge.benchmarks.cases import BenchCase, Source
    from sfedge.benchmarks.worker import run_case

    case = BenchCase(source=Source(preset="tiny"), video=str(demo_video), gen_tokens=3, repetitions=1, warmup=0, questions=3)
    assert case.name.endswith("+q3")
    record = run_case(case)
    metrics = record["metrics"]
    for i in (1, 2, 3):
        assert metrics[f"q{i}_ttft_ms"]["mean"] > 0 and metrics[f"q{i}_prompt_tokens"]["mean"] > 0
    assert metrics["ttft_ms"]["mean"] == metrics["q1_ttft_ms"]["mean"]
    # question 2 prefills only its own tokens (no video work, no visual tokens): checked on token counts,
    # not on timings, which a shared machine makes noisy
    assert metrics["q2_prompt_tokens"]["mean"] < record["visual_tokens"]
    assert metrics["q1_prompt_tokens"]["mean"] + record["visual_tokens"] < record["num_prompt_tokens"]
    assert record["num_prompt_tokens"] > record["visual_tokens"]


def test_chats_sharing_a_pipeline_do_not_read_each_others_cache(pipeline, demo_video, tmp_path):
    other_video = make_demo_video(tmp_path / "other.mp4", seconds=1.0, fps=12, size=96)
    first = pipeline.open_video(demo_video)
    ask(first, LONG_Q)
    second = pipeline.open_video(other_video)  # overwrites the session's cache
    _, _, second_logits = ask(second, SHORT_Q)
    _, _, first_logits = ask(first, "And then?", follow_up=True)
    "".join(pipeline.stream(demo_video, SHORT_Q, max_new_tokens=2))  # single-shot: starts the cache over
    _, _, second_again = ask(second, SHORT_Q)

    alone = fresh().open_video(demo_video)
    ask(alone, LONG_Q)
    _, _, expected_first = ask(alone, "And then?", follow_up=True)
    torch.testing.assert_close(first_logits, expected_first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second_again, second_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first_logits, second_logits, atol=1e-3)


def test_bench_realtime_replays_the_clip_and_times_the_question_after_the_last_frame(demo_video):
    from sfedge.benchmarks.cases import BenchCase, Source
    from sfedge.benchmarks.worker import run_case

    case = BenchCase(source=Source(preset="tiny"), video=str(demo_video), gen_tokens=2, repetitions=1, warmup=0, realtime=True)
    assert case.name.endswith("+rt")
    record = run_case(case)
    metrics = {name: values["mean"] for name, values in record["metrics"].items()}
    assert metrics["rt_frames_seen"] == 24 and metrics["rt_frames_encoded"] == 8 and record["frames"] == 8
    assert metrics["rt_replay_s"] >= 1.8  # 24 frames at 12 fps, delivered at their own rate
    assert metrics["ttft_ms"] >= metrics["projector_ms"] + metrics["prefill_ms"] > 0


def test_cli_chat_interactive_commands(demo_video, tmp_path, capsys, monkeypatch):
    import io

    saved = tmp_path / "session.prefix.safetensors"
    lines = [SHORT_Q, "/stats", f"/save {saved}", "And then?", "/reset", "/nope", ""]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines)))
    assert main(["chat", "--model", "tiny", "--video", str(demo_video), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert len(re.findall(r"\[TTFT \d+ ms", err)) == 2 and "visual tokens 40" in err
    assert f"[saved {saved}]" in err and saved.exists()
    assert "[back to the bare video prefix]" in err and "commands: /reset" in err
