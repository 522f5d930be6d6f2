"""Export memory: per-stage peak RSS in the manifest, the up-front refusal, and part-by-part building."""
import json

import numpy as np
import pytest
import torch

from sfedge.cli import main
from sfedge.config import get_preset
from sfedge.errors import UsageError
from sfedge.export.common import Progress, stage_table
from sfedge.export.memory_estimate import OVERRIDE_FLAG, MemoryEstimate, check_memory, estimate_export_peak
from sfedge.manifest import Manifest, StageRecord, read_manifest
from sfedge.memory import GiB, LIMIT_ENV, Available, InsufficientMemory, available_memory, parse_size, peak_rss
from sfedge.models import PARTS, WeightsSource, build_model, empty_model, fill_part, part_is_empty, release_part


def test_parse_size_units_and_bad_input():
    assert parse_size("1MiB") == 2 ** 20 and parse_size("12GiB") == 12 * GiB and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("4096") == 4096 and parse_size(" 2 kib ") == 2048
    for bad in ("", "twelve", "12 parsecs", "-1GiB"):
        with pytest.raises(UsageError, match=LIMIT_ENV):
            parse_size(bad)


def test_available_memory_reads_the_machine_or_the_override(monkeypatch):
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    machine = available_memory()
    assert machine.nbytes > 0 and machine.source in ("MemAvailable", "cgroup memory limit", "psutil available")
    monkeypatch.setenv(LIMIT_ENV, "3GiB")
    assert available_memory() == Available(3 * GiB, LIMIT_ENV)


def test_stage_peak_sees_an_allocation_inside_the_stage():
    with Progress(enabled=False) as progress:
        with progress.stage("probe", "small"):
            pass
        with progress.stage("probe", "allocate"):
            block = np.ones(256 * 2 ** 20 // 8)  # 256 MiB, touched
            del block
    small, big = progress.records
    assert big.peak_rss_bytes - small.peak_rss_bytes >= 200 * 2 ** 20
    assert (small.component, small.stage) == ("probe", "small") and small.seconds >= 0
    assert peak_rss() >= big.peak_rss_bytes
    table = stage_table(progress.records, peak_rss())
    assert "allocate" in table and "peak GiB" in table and "(process)" in table


def test_a_reading_taken_before_a_stage_began_is_not_its_peak():
    """The sampler thread may read the RSS while the previous stage still holds memory and record it just after the
    next stage began (the GIL can switch between the two): such a reading must not count for the new stage."""
    from sfedge.memory import RssSampler, current_rss

    sampler = RssSampler()  # thread not started: the race is played by hand
    stale_epoch = sampler._epoch
    sampler.reset()
    sampler._observe(current_rss() + 8 * GiB, stale_epoch)  # read before reset(), recorded after it
    assert sampler.high() < current_rss() + GiB
    sampler._observe(current_rss() + 8 * GiB, sampler._epoch)  # a reading of this stage counts
    assert sampler.high() >= current_rss() + 7 * GiB


def test_check_memory_refuses_with_one_line_naming_estimate_available_and_flag():
    estimate = MemoryEstimate(10 * GiB, "llm", {"vision_encoder": GiB, "projector": 1, "llm": 6 * GiB}, 0)
    assert check_memory(estimate, Available(11 * GiB, "MemAvailable")).nbytes == 11 * GiB
    with pytest.raises(InsufficientMemory) as info:
        check_memory(estimate, Available(8 * GiB, "MemAvailable"))
    message = str(info.value)
    assert "\n" not in message and "10.00 GiB" in message and "8.00 GiB available (MemAvailable)" in message
    assert OVERRIDE_FLAG in message


def test_estimate_grows_with_the_model():
    small = estimate_export_peak(empty_model(get_preset("tiny"), max_seq_len=128), "onnx")
    one = estimate_export_peak(empty_model(get_preset("sf-llava-1.5-1b"), max_seq_len=2048), "onnx")
    three = estimate_export_peak(empty_model(get_preset("sf-llava-1.5-3b"), max_seq_len=2048), "onnx")
    assert small.peak_bytes < one.peak_bytes < three.peak_bytes and one.largest_part == "llm"
    # the 1B LLM: 1.54 B parameters, the tied lm_head counted once
    assert 1.5e9 < one.part_bytes["llm"] / 4 < 1.6e9


def test_refused_export_exits_1_with_one_line_and_leaves_no_folder(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(LIMIT_ENV, "1MiB")
    out = tmp_path / "new" / "tiny_onnx"
    code = main(["export", "--model", "tiny", "--backend", "onnx", "--max-context", "128", "--prefill-chunk", "16",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "estimated" in err and "0.00 GiB available (SFEDGE_MEMORY_LIMIT)" in err and OVERRIDE_FLAG in err
    assert not out.exists() and not out.parent.exists()


def test_parts_filled_one_at_a_time_equal_the_whole_build():
    config = get_preset("tiny")
    whole = build_model(config, WeightsSource(seed=3), 64)
    model = empty_model(config, WeightsSource(seed=3), 64)
    assert all(part_is_empty(model, part) for part in PARTS)
    for part in PARTS:
        fill_part(model, WeightsSource(seed=3), part)
    want, got = whole.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert model.text_decoder.lm_head.weight is model.token_embedding.embed_tokens.weight  # still tied
    release_part(model, "llm")
    assert part_is_empty(model, "llm") and not part_is_empty(model, "vision_encoder")
    assert model.text_decoder.layers[0].self_attn.attend.cache.k_cache.is_meta


def test_layer_by_layer_fill_draws_the_whole_decoder_stream():
    """The decoder filled one layer at a time (a callback after each) holds the tensors one random_state
    pass over the whole decoder gives: the order of the random stream is unchanged."""
    from sfedge.models import _generator, random_state

    config = get_preset("tiny")
    model = empty_model(config, WeightsSource(seed=5), 64)
    seen = []
    fill_part(model, WeightsSource(seed=5), "llm", on_layer=lambda layer: seen.append(layer))
    assert seen == list(model.text_decoder.layers)
    reference = empty_model(config, WeightsSource(seed=5), 64).text_decoder
    want = random_state(reference, _generator(5, "text_decoder"), torch.float32)
    got = dict(model.text_decoder.named_parameters(remove_duplicate=False))
    for name, tensor in want.items():
        if name != "lm_head.weight":  # tied to the token embedding
            assert torch.equal(got[name], tensor), name


def test_manifest_without_stage_records_still_reads():
    manifest = Manifest("onnx", "fp32", "tiny", {}, {}, {}, {}, {}, [])
    data = json.loads(manifest.to_json())
    assert data["stages"] == [] and data["export_peak_rss_bytes"] is None
    del data["stages"], data["export_peak_rss_bytes"]  # as written before stage records existed
    old = Manifest.from_dict(data)
    assert old.stages == [] and old.export_peak_rss_bytes is None
    data["stages"] = [{"component": "llm", "stage": "lower", "seconds": 1.5, "peak_rss_bytes": 123}]
    assert Manifest.from_dict(data).stages == [StageRecord("llm", "lower", 1.5, 123)]


@pytest.mark.slow
def test_tiny_export_passes_the_check_and_records_every_stage(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    out = tmp_path / "tiny_onnx"
    code = main(["export", "--model", "tiny", "--backend", "onnx", "--max-context", "128", "--prefill-chunk", "16",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "[export] memory: estimated peak" in err and "peak GiB" in err and "(process)" in err
    manifest = read_manifest(out)
    stages = {(r.component, r.stage) for r in manifest.stages}
    assert {("vision_encoder", "build"), ("llm", "build"), ("text_decoder", "trace"),
            ("decoder_model_merged", "quantize")} <= stages
    assert all(r.peak_rss_bytes and r.peak_rss_bytes > 0 for r in manifest.stages)
    assert manifest.export_peak_rss_bytes >= max(r.peak_rss_bytes for r in manifest.stages)


@pytest.mark.slow
def test_override_flag_exports_past_a_low_limit(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(LIMIT_ENV, "1MiB")
    out = tmp_path / "tiny_onnx"
    code = main(["export", "--model", "tiny", "--backend", "onnx", "--max-context", "128", "--prefill-chunk", "16",
                 "--quiet", OVERRIDE_FLAG, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert read_manifest(out).export_options["memory_check"] is False


def test_frugal_fp16_overflow_check_answers_as_coremltools_and_restores_it():
    pytest.importorskip("coremltools")
    from sfedge.export import coreml_convert
    from sfedge.export.coreml_convert import _fits_fp16, frugal_fp16_overflow_check
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    def coremltools_test(value):  # the expression of coremltools 9.0's fp16_overflow, for one const
        magnitude = np.abs(np.expand_dims(value, 0))
        return not np.max(magnitude[np.where(magnitude < 1e38)], initial=0.0) > 65504

    rng = np.random.default_rng(0)
    cases = [rng.standard_normal((64, 48)).astype(np.float32), np.array(3.0e5, np.float32),
             np.array([1.0, np.inf, -np.inf, np.nan], np.float32), np.array([65504.0, -65504.0], np.float32),
             np.array([3e38, 7e4], np.float32), np.array([3e38, 1.0], np.float32), np.zeros((0,), np.float32)]
    big = rng.standard_normal(70_000).astype(np.float32)
    big[-1] = -7e4  # in the last slice
    cases.append(big)
    original = FP16ComputePrecision.__dict__["fp16_overflow"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(coreml_convert, "OVERFLOW_CHUNK", 1024)
        for value in cases:
            assert _fits_fp16(value) == coremltools_test(value), value
        with frugal_fp16_overflow_check():
            assert FP16ComputePrecision.__dict__["fp16_overflow"] is not original
    assert FP16ComputePrecision.__dict__["fp16_overflow"] is original


def test_frugal_allclose_answers_as_numpy_and_restores_it():
    from sfedge.export import coreml_convert

    rng = np.random.default_rng(1)
    a = rng.integers(-8, 8, size=(300, 40)).astype(np.int8)
    b = a.copy()
    c = a.copy()
    c[-1, -1] += 1  # differs in the last slice only
    original = np.allclose
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(coreml_convert, "OVERFLOW_CHUNK", 1000)
        with coreml_convert.frugal_allclose():
            assert np.allclose is not original
            assert np.allclose(a, b, rtol=0.0, atol=1e-12) and not np.allclose(a, c, rtol=0.0, atol=1e-12)
            assert np.allclose(a.astype(np.float32), a.astype(np.float32) + 1e-7, rtol=0.0, atol=1e-6)
            assert np.allclose([1.0], [1.0])  # lists and small arrays go to numpy's own
    assert np.allclose is original


def test_coreml_estimate_follows_the_route_of_the_recipe():
    import sfedge.export.coreml  # noqa: F401  (registers coreml as a part-by-part exporter)

    one = empty_model(get_preset("sf-llava-1.5-1b"), max_seq_len=2048)
    int4, fp16 = estimate_export_peak(one, "coreml", "int4"), estimate_export_peak(one, "coreml", "fp16")
    # int4: the LLM is quantized in torch, the vision encoder (converted in float32, then int8) sets the peak
    assert int4.peak_bytes < 8 * GiB < fp16.peak_bytes
    assert estimate_export_peak(one, "coreml", "palettize4").peak_bytes == fp16.peak_bytes  # compressed after conversion
    assert estimate_export_peak(one, "coreml").peak_bytes == fp16.peak_bytes  # no recipe: the float route, errs high
