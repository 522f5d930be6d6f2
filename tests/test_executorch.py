"""ExecuTorch (XNNPACK) backend: every recipe exported once (tiny preset), checked against eager."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch", reason="the executorch extra is not installed (pip install 'sfedge[executorch]')")

from sfedge.errors import SfedgeError, UsageError  # noqa: E402
from sfedge.export.api import ExportOptions, export_model  # noqa: E402
from sfedge.manifest import CONSTANT_METHODS, Component, read_manifest  # noqa: E402
from sfedge.models import WeightsSource, build_model  # noqa: E402
from sfedge.quantize.executorch import decoder_options, quantize_component  # noqa: E402
from sfedge.quantize.recipes import Tolerance, get_recipe, recipe_names  # noqa: E402
from sfedge.runtime.generate import prefill  # noqa: E402
from sfedge.runtime.parity import compare_sessions, run_parity  # noqa: E402
from sfedge.runtime.sessions import SessionOptions, open_session  # noqa: E402
from sfedge.runtime.sessions.eager import EagerSession  # noqa: E402
import sfedge.export.executorch as et_export  # noqa: E402  (registers the exporter and the recipes)
from conftest import TINY_CUT_CONFIG, EXECUTORCH_EXTRA_FRAMES, EXECUTORCH_OPTIONS, KERNELS_RECIPE, PREFIX_EXPORT_GROUP  # noqa: E402

RECIPES = recipe_names("executorch")
EXPECTED_RECIPES = {"fp32", "8da8w", "8da4w", "8da4w-g128", "8da4w-emb8", "8da4w-emb4", "8da4w-embfp32", "8da4w-kv16",
                    "8da4w-kvbf16", "8da4w-flat", "fp32-flat", "8da4w-vstatic", "8da4w-sfedge", "8da4w-sfedge-bf16",
                    "8da4w-g128-sfedge-bf16", "fp32-sfedge"}
ALIASES = {"8da4w-emb4"}  # the same schemes as 8da4w under its old name: not exported twice


# The tiny preset cut to one LLM layer and one vision block, exported with a static encoder batch of 2,
# prefill chunks of 32 and (fp32) an extra 4-frame projector: tests/conftest.py (shared with test_profile.py).
CONFIG = TINY_CUT_CONFIG
MAX_CONTEXT, CHUNK, BATCH = (EXECUTORCH_OPTIONS["max_context"], EXECUTORCH_OPTIONS["prefill_chunk"],
                              EXECUTORCH_OPTIONS["encoder_batch"])
HIDDEN = CONFIG.llm.hidden
EXTRA_FRAMES = EXECUTORCH_EXTRA_FRAMES


def _export(recipe: str, out: Path, parallel_parts: bool = True):
    """A fresh export (for the tests that make one fail); the others share ``executorch_export``'s folders."""
    options = ExportOptions(backend="executorch", recipe=recipe, max_context=MAX_CONTEXT, prefill_chunk=CHUNK,
                            encoder_batch=BATCH, show_progress=False, parallel_parts=parallel_parts,
                            extra_frames=EXTRA_FRAMES if recipe == "fp32" else ())
    return export_model(CONFIG, WeightsSource(seed=0), options, out)


@pytest.fixture(scope="module")
def fp32_folder(executorch_export) -> Path:
    return executorch_export("fp32")


def test_recipes_registered():
    assert set(RECIPES) == EXPECTED_RECIPES


def _quantized_eager(folder: Path, recipe: str) -> EagerSession:
    """The folder's eager model quantized in place with the recipe (torchao): the reference that isolates the export."""
    session = EagerSession.open(folder, read_manifest(folder), SessionOptions())
    for component in Component:
        quantize_component(getattr(session.model, component.value), component.value,
                           get_recipe("executorch", recipe).scheme(component))
    return session


@pytest.mark.parametrize("recipe", [pytest.param(name, marks=PREFIX_EXPORT_GROUP) if name == KERNELS_RECIPE else name
                                    for name in RECIPES if name not in ALIASES])
@pytest.mark.slow
def test_parity_per_recipe(executorch_export, recipe: str):
    exported = executorch_export(recipe)
    manifest = read_manifest(exported)
    tolerance = get_recipe("executorch", recipe).tolerance
    report = run_parity(exported, steps=16)  # components vs fp32; top-1 vs fp32 or the simulated recipe
    print("\n" + report.table())
    assert report.passed, report.table()
    assert report.top1_reference == ("eager fp32" if recipe == "fp32" else f"eager + {recipe} (simulated)")
    if recipe != "fp32":
        # Top-1 against fp32 measures torchao's quantization error on random weights (reported above);
        # top-1 against the same recipe applied in eager PyTorch measures what the export adds.
        rows, summary = compare_sessions(_quantized_eager(exported, recipe), open_session(exported),
                                         Tolerance(min_cosine=0.999), steps=16)
        print(f"vs eager {recipe}: " + ", ".join(f"{r.component} max abs {r.max_abs:.3g} cos {r.cosine:.6f}" for r in rows)
              + f"; top-1 {summary['top1_agreement']:.1%}")
        assert all(row.passed for row in rows), rows
        assert summary["top1_agreement"] >= tolerance.min_top1, summary
    for component in Component:
        scheme = get_recipe("executorch", manifest.recipe).scheme(component)
        assert manifest.component(component).quantization["scheme"] == scheme.scheme
    kv_dtype, attention = decoder_options(get_recipe("executorch", recipe).scheme(Component.TEXT_DECODER))
    decoder = manifest.component(Component.TEXT_DECODER)
    assert (decoder.extra["kv_dtype"], decoder.extra["attention_mode"]) == (kv_dtype, attention)


@pytest.mark.slow
def test_pte_methods_and_constants(fp32_folder: Path):
    session = open_session(fp32_folder)
    programs = session._programs  # (file, method) -> Program
    assert set(programs) == {("llm.pte", "text_decoder")}  # the other components load on first use
    session.encode(torch.zeros(1, 3, 64, 64))
    session.project(torch.zeros(8, 16, 64))
    session.project(torch.zeros(4, 16, 64))
    assert programs[("vision_encoder.pte", "vision_encoder")].method_names == {"vision_encoder"}
    assert programs[("projector.pte", "projector")].method_names == {"projector"}
    assert programs[("projector_f4.pte", "projector")].method_names == {"projector"}
    assert programs[("llm.pte", "text_decoder")].method_names == {"token_embedding", "text_decoder", *CONSTANT_METHODS}
    llm = CONFIG.llm
    assert session.constant("get_max_seq_len") == MAX_CONTEXT
    assert session.constant("get_max_context_len") == MAX_CONTEXT
    assert session.constant("get_bos_id") == llm.bos_id
    assert session.constant("get_eos_ids") == list(llm.eos_ids)
    assert session.constant("get_vocab_size") == llm.vocab_size
    assert session.constant("use_kv_cache") is True
    assert (session.encoder_batch, session.frames, session.max_prefill_chunk) == (BATCH, 8, CHUNK)


@pytest.mark.slow
def test_load_for_video_loads_what_a_video_question_runs_into_the_load_time(fp32_folder: Path):
    """`sfedge run --video` and `sfedge bench` load the vision encoder and the projector before the question (counted
    in load_ms), so the first TTFT holds no method loading; a text-only session still loads them on first use."""
    from sfedge.runtime.pipeline import Pipeline, VideoOptions

    pipeline = Pipeline.from_folder(fp32_folder)
    programs = pipeline.session._programs
    assert set(programs) == {("llm.pte", "text_decoder")}
    opened_ms = pipeline.load_ms
    pipeline.load_for_video(VideoOptions(max_frames=4))
    assert set(programs) == {("llm.pte", "text_decoder"), ("vision_encoder.pte", "vision_encoder"),
                             ("projector_f4.pte", "projector"), ("llm.pte", "token_embedding")}
    assert set(pipeline.session._methods) == {"text_decoder", "vision_encoder", "token_embedding"}
    assert 4 in pipeline.session._projectors and pipeline.load_ms > opened_ms
    with pytest.raises(SfedgeError, match="has projectors for 8,4 frames, not 16"):
        pipeline.load_for_video(VideoOptions(max_frames=16))


@pytest.mark.slow
def test_extra_frame_counts_get_their_own_projector(fp32_folder: Path):
    manifest = read_manifest(fp32_folder)
    assert {f: e.file for f, e in manifest.projectors().items()} == {8: "projector.pte", 4: "projector_f4.pte"}
    assert manifest.export_options["frame_counts"] == [8, 4]
    session = open_session(fp32_folder)
    eager = EagerSession(build_model(CONFIG, WeightsSource(seed=0), MAX_CONTEXT))
    assert session.frame_counts == (8, 4) and session.frames == 8
    for frames in (8, 4):
        features = torch.randn(frames, CONFIG.vision.patches_per_frame, CONFIG.vision.width)
        expected = eager.project(features)
        got = session.project(features)
        assert got.shape == expected.shape and (got - expected).abs().max().item() <= 1e-4
    with pytest.raises(SfedgeError, match="projectors for 8,4 frames, not 5"):
        session.project(torch.zeros(5, CONFIG.vision.patches_per_frame, CONFIG.vision.width))
    report = run_parity(fp32_folder, steps=4)
    assert [r.component for r in report.rows][:3] == ["vision_encoder", "projector", "projector[4f]"] and report.passed


@pytest.mark.slow
def test_manifest_entries(fp32_folder: Path):
    manifest = read_manifest(fp32_folder)
    decoder = manifest.component("text_decoder")
    assert decoder.file == "llm.pte" and decoder.method == "text_decoder"
    assert [(t.name, t.shape, t.dtype) for t in decoder.inputs] == [
        ("inputs_embeds", [1, "tokens", HIDDEN], "float32"), ("input_pos", [1], "int64")]
    assert [(t.shape, t.dtype) for t in decoder.outputs] == [([1, 512], "float32")]
    embedding = manifest.component("token_embedding")
    assert embedding.inputs[0].shape == [1, "tokens"] and embedding.inputs[0].dtype == "int64"
    assert manifest.component("vision_encoder").inputs[0].shape == [BATCH, 3, 64, 64]
    assert manifest.component("projector").inputs[0].shape == [8, 16, 64]
    stages = manifest.export_options["stage_seconds"]
    for stage in ("quantize", "trace", "lower", "serialize"):
        assert any(key.endswith(f".{stage}") for key in stages), stages


@pytest.mark.slow
def test_long_prompt_chunked_prefill_and_padded_encoder_batch(fp32_folder: Path):
    session = open_session(fp32_folder)
    eager = EagerSession.open(fp32_folder, read_manifest(fp32_folder), SessionOptions())
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (3 * CHUNK + 5,), generator=generator)  # longer than the prefill chunk
    embeds = eager.embed(ids)
    assert torch.allclose(session.embed(ids), embeds, atol=1e-6)
    session.reset()
    eager.reset()
    got, want = prefill(session, embeds), prefill(eager, embeds)
    assert (got - want).abs().max().item() <= 1e-4
    nxt = eager.embed(torch.tensor([int(want.argmax())]))
    assert (session.decode(nxt, ids.shape[0]) - eager.decode(nxt, ids.shape[0])).abs().max().item() <= 1e-4
    pixels = torch.randn(BATCH + 1, 3, 64, 64, generator=generator).clamp(-1, 1)  # last batch padded
    assert (session.encode(pixels) - eager.encode(pixels)).abs().max().item() <= 1e-4
    with pytest.raises(SfedgeError, match="prefill chunk"):
        session.decode(embeds[: CHUNK + 1], 0)
    with pytest.raises(SfedgeError, match="frames"):
        session.project(torch.zeros(3, 16, 64))


def test_unknown_recipe_lists_valid_ones(tmp_path: Path):
    with pytest.raises(UsageError, match="8da4w-emb4") as info:
        _export("int3", tmp_path / "x")
    assert "int3" in str(info.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["4w", "8w"])
def test_weight_only_recipe_refused_with_reason(tmp_path: Path, name: str):
    with pytest.raises(UsageError, match="wrong logits") as info:
        _export(name, tmp_path / "x")
    assert "8da4w" in str(info.value) and name in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("parallel_parts", [False, True], ids=["one-process", "vision-beside-llm"])
def test_interrupted_export_leaves_no_folder(tmp_path: Path, monkeypatch, parallel_parts: bool):
    """A crash mid-export leaves neither the folder nor a .partial sibling: in one process after two .pte files were
    written; with the vision parts in a second process, in the parent's LLM lowering (the child is killed)."""
    calls = []

    def failing_lower(programs, constant_methods=None, per_op_linears=True, **kwargs):
        calls.append(sorted(programs))
        if parallel_parts or len(calls) > 1:  # one process: vision_encoder.pte and projector.pte were written
            raise RuntimeError("simulated crash mid-export")
        return b"partial"

    monkeypatch.setattr(et_export, "lower_programs", failing_lower)  # this process only: the spawned child lowers for real
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    out = tmp_path / "tiny_executorch_fp32"
    with pytest.raises(RuntimeError, match="simulated"):
        _export("fp32", out, parallel_parts=parallel_parts)
    assert calls == ([["text_decoder", "token_embedding"]] if parallel_parts else [["projector"], ["projector"]])
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a .partial sibling


@pytest.mark.slow
def test_executorch_runner_peer_runs_the_same_pte(fp32_folder: Path, capsys):
    """ExecuTorch's own C++ runner loads our llm.pte (method names, constants, tokenizer.json) and is timed beside ours."""
    from sfedge.benchmarks import peers

    argv = [str(fp32_folder), "--peer", "executorch-runner", "--prompt-tokens", "12", "--gen-tokens", "4", "-r", "1",
            "--warmup", "0"]
    assert peers.main(argv) == 0
    table = capsys.readouterr().out
    assert "ExecuTorch 1.5.1 runner" in table and "sfedge executorch" in table and "decode after 12 tok" in table
    # the runner loads the methods inside its first generate(): that time is part of its load, not lost
    methods_ms = re.search(r"runner: load = constructor [\d,]+ ms \+ llm.pte's methods ([\d,]+) ms", table)
    assert methods_ms and float(methods_ms.group(1).replace(",", "")) > 0, table
    too_long = [str(fp32_folder), "--peer", "executorch-runner", "--prompt-tokens", str(CHUNK + 1), "-r", "1"]
    assert peers.main(too_long) == 2
    assert "prefill chunk" in capsys.readouterr().err


def test_sdpa_probe_times_the_kernel_of_llm_pte(capsys):
    from sfedge.benchmarks import sdpa_probe

    rows = sdpa_probe.probe("tiny", [4, 64], [1], repeats=2)
    assert [r["position"] for r in rows] == [4, 64] and all(r["ms_per_layer"] > 0 for r in rows)
    assert sdpa_probe.main(["--model", "tiny", "--positions", "8", "--threads", "1", "-r", "1"]) == 0
    assert "| causal | 8 |" in capsys.readouterr().out
    assert sdpa_probe.main(["--model", "tiny", "--positions", "0,x"]) == 2


@pytest.mark.slow
def test_flat_decode_method_shares_the_kv_cache(executorch_export):
    """fp32-flat: prefill through text_decoder (causal), decode through text_decoder_flat (gqa-masked) past
    30% of the cache, both on one KV cache: logits as eager fp32's at every step (1e-4)."""
    folder = executorch_export("fp32-flat")
    decoder = read_manifest(folder).component(Component.TEXT_DECODER)
    assert decoder.extra["decode_method"] == "text_decoder_flat" and decoder.extra["decode_method_from_position"] == 38
    session = open_session(folder)
    assert session._decoder_program().method_names >= {"text_decoder", "text_decoder_flat"}
    eager = EagerSession.open(folder, read_manifest(folder), SessionOptions())
    used = []
    flat = session._flat_decoder
    session._flat_decoder = lambda: used.append(1) or flat()
    embeds = torch.randn(MAX_CONTEXT, HIDDEN, generator=torch.Generator().manual_seed(3))
    for start, size in ((0, 30), (30, 1), (31, 1), (32, 6), (38, 1), (39, 1), (40, CHUNK), (40 + CHUNK, 1)):
        got, want = session.decode(embeds[start:start + size], start), eager.decode(embeds[start:start + size], start)
        assert (got - want).abs().max().item() <= 1e-4, (start, size)
    assert len(used) == 3  # positions 38, 39 and 72 took the flat method


@pytest.mark.parametrize("file", ["llm.pte", "vision_encoder.pte"])
@pytest.mark.slow
def test_truncated_pte_without_verification_is_a_one_line_error(fp32_folder: Path, tmp_path, capsys, file):
    """--no-verify skips the sha256, so the loader meets the damaged file: one line naming it, no traceback."""
    import shutil

    from sfedge.cli import main

    folder = tmp_path / "damaged"
    shutil.copytree(fp32_folder, folder)
    data = (folder / file).read_bytes()
    (folder / file).write_bytes(data[: len(data) // 2])
    video = tmp_path / "clip.mp4"
    from sfedge.runtime.video import make_demo_video

    make_demo_video(video, seconds=1.0, fps=8, size=64)
    code = main(["run", str(folder), "--video", str(video), "--prompt", "hi", "--max-new-tokens", "2", "--no-verify"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert f"{file} is not a loadable ExecuTorch program" in err, err


@pytest.mark.slow
def test_vision_parts_lowered_beside_the_llm_give_the_same_files(executorch_export, tmp_path, monkeypatch):
    """The default on two or more cores: the vision encoder and projectors in a second process while this one
    exports the LLM; every file is byte-identical to the one-process export's, and the manifest keeps every stage."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    serial = read_manifest(executorch_export("8da4w"))
    manifest = _export("8da4w", tmp_path / "side_by_side")
    assert manifest.export_options["parallel_parts"] and not serial.export_options["parallel_parts"]
    assert [(c.component, c.file, c.sha256) for c in manifest.components] == \
        [(c.component, c.file, c.sha256) for c in serial.components]
    assert [(r.component, r.stage) for r in manifest.stages] == [(r.component, r.stage) for r in serial.stages]
    assert manifest.export_peak_rss_bytes >= max(r.peak_rss_bytes for r in manifest.stages)
