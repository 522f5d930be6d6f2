"""Video chat over exported tiny artifacts (ONNX Runtime and ExecuTorch, fp32): reuse changes no
answer, the answers match the eager chat, a saved prefix round-trips and is refused by another export."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import EXECUTORCH_EXTRA_FRAMES, EXECUTORCH_OPTIONS, TINY_CUT_CONFIG
from sfedge.errors import SfedgeError
from sfedge.runtime.pipeline import Pipeline
from sfedge.runtime.sampling import SamplingConfig

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chat_exports")]  # pytest-xdist: on one worker

# 39 prompt tokens (two prefill chunks of 32) after the 68 of the video prefix: with 6 new tokens, 113 of the 128 slots
LONG_Q = "What happens in the video? Describe every object and where it moves."
SHORT_Q = "Where is the square?"
SAMPLED = SamplingConfig(temperature=2.0, seed=3)
MAX_CONTEXT, CHUNK = EXECUTORCH_OPTIONS["max_context"], EXECUTORCH_OPTIONS["prefill_chunk"]
TOLERANCE = 1e-3  # fp32 exports against eager (the parity checks' fp32 tolerance is of this order)
BACKENDS = {"onnx": "onnx", "executorch": "executorch.runtime"}


@pytest.fixture(scope="module")
def folders(export_once):
    """backend -> its fp32 export of the tiny preset cut to one LLM layer and one vision block (half the
    lowering time of the full tiny; a chat needs no more), 128 cache slots, prefill chunks of 32: made once per
    session, read only. The ExecuTorch one is test_executorch.py's fp32 folder (encoder batch 2, a 4-frame projector)."""
    def get(backend: str) -> Path:
        pytest.importorskip(BACKENDS[backend], reason=f"the {backend} extra is not installed")
        if backend == "executorch":  # the arguments of conftest's executorch_export("fp32")
            return export_once(backend, config=TINY_CUT_CONFIG, **EXECUTORCH_OPTIONS, extra_frames=EXECUTORCH_EXTRA_FRAMES)
        return export_once(backend, config=TINY_CUT_CONFIG, max_context=MAX_CONTEXT, prefill_chunk=CHUNK)

    return get


def test_executorch_embed_leaves_the_kv_cache_alone(folders):
    """Methods loaded from one ExecuTorch Program share its planned memory: running llm.pte's token_embedding
    used to overwrite the text_decoder's KV cache, so any embed() between decode() calls (a question after
    the video prefix, every step of plain generation) read a corrupted cache. The session now loads each
    component from its own Program; a decode after an embed() equals one without it."""
    from sfedge.runtime.generate import prefill
    from sfedge.runtime.sessions import open_session

    session = open_session(folders("executorch"))
    hidden = TINY_CUT_CONFIG.llm.hidden
    prefix, question = torch.randn(40, hidden), torch.randn(8, hidden)
    session.reset()
    prefill(session, prefix)
    clean = prefill(session, question, 40)
    session.reset()
    prefill(session, prefix)
    session.embed(torch.arange(4) + 5)
    after_embed = prefill(session, question, 40)
    torch.testing.assert_close(after_embed, clean)



def answer(chat, question, sampling=SamplingConfig()):
    "".join(chat.ask(question, max_new_tokens=6, sampling=sampling))
    return list(chat.last_answer_ids), chat.last_logits.clone()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_reuse_changes_no_answer_on_exports(folders, backend, demo_video):
    folder = folders(backend)
    chat = Pipeline.from_folder(folder).open_video(demo_video)
    answer(chat, LONG_Q, SAMPLED)
    greedy, logits = answer(chat, SHORT_Q)
    sampled, _ = answer(chat, SHORT_Q, SAMPLED)

    alone = Pipeline.from_folder(folder).open_video(demo_video)
    greedy_alone, logits_alone = answer(alone, SHORT_Q)
    sampled_alone, _ = answer(alone, SHORT_Q, SAMPLED)
    assert greedy == greedy_alone and sampled == sampled_alone
    torch.testing.assert_close(logits, logits_alone, atol=1e-5, rtol=1e-5)

    eager = Pipeline.from_folder(folder, backend="eager").open_video(demo_video)
    eager_greedy, eager_logits = answer(eager, SHORT_Q)
    assert eager_greedy == greedy
    torch.testing.assert_close(logits, eager_logits, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_saved_prefix_round_trips_on_exports(folders, backend, demo_video, tmp_path):
    folder = folders(backend)
    pipeline = Pipeline.from_folder(folder)
    chat = pipeline.open_video(demo_video)
    ids, logits = answer(chat, SHORT_Q)
    path = chat.save(tmp_path / "prefix.safetensors")
    cached = Pipeline.from_folder(folder).open_video(demo_video, cache=path)
    cached_ids, cached_logits = answer(cached, SHORT_Q)
    assert cached_ids == ids
    torch.testing.assert_close(cached_logits, logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(SfedgeError, match="stale video prefix: saved for another export/model"):
        Pipeline.from_folder(folder, backend="eager").open_video(demo_video, cache=path)
    other = folders("onnx" if backend == "executorch" else "executorch")
    with pytest.raises(SfedgeError, match="stale video prefix: saved for another export/model"):
        Pipeline.from_folder(other).open_video(demo_video, cache=path)
