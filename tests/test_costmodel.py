"""Cost model: fits recover known coefficients from synthetic timings, predictions add up, the plan
ranks and filters, extrapolation is flagged, a profile from another backend/export is refused, and a
real profile of the eager tiny preset is measured and validated end to end."""
from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys

import pytest

from sfedge.benchmarks.costmodel import (SCHEMA, DeviceProfile, Machine, ProfiledModel, check_applies_to_folder,
                                         fit_linear, load_profile, predict, prefill_ms)
from sfedge.benchmarks.plan import candidates, parse_bytes, parse_duration_ms
from sfedge.cli import main
from sfedge.errors import SfedgeError, UsageError

# a made-up machine/model: the true costs the synthetic timings are drawn from
TRUE = {"video": (5.0, 2.0), "encode": (3.0, 40.0), "projector": (1.0, 0.5), "prefill": (0.8, 0.0004),
        "decode": (20.0, 0.002), "vision_mem": (50e6, 9e6), "llm_mem": (300e6, 30e3)}  # llm_mem: bytes + bytes per position


def _line(name, xs, noise=0.0, rng=None):
    a, b = TRUE[name]
    return [(x, (a + b * x) * (1 + (rng.uniform(-noise, noise) if rng else 0.0))) for x in xs]


def synthetic_profile(preset="sf-llava-1.5-1b", backend="executorch", sha="ab" * 32, frames=(4, 16), noise=0.0,
                      max_position=1000) -> DeviceProfile:
    rng = random.Random(0)
    fits = {
        "video_ms": fit_linear(_line("video", frames, noise, rng), "frames", "ms"),
        "encode_call_ms": fit_linear(_line("encode", [1, 2, 4], noise, rng), "frames_per_call", "ms"),
        "projector_ms": fit_linear(_line("projector", frames, noise, rng), "frames", "ms"),
        "embed_ms": fit_linear([(40, 2.0)], "text_tokens", "ms"),
        "prefill_ms_per_token": fit_linear(_line("prefill", range(32, max_position, 64), noise, rng), "position", "ms_per_token"),
        "decode_ms_per_token": fit_linear(_line("decode", [3.5, 200, 600, max_position - 10], noise, rng), "position", "ms_per_token"),
        "vision_bytes": fit_linear(_line("vision_mem", frames, noise, rng), "frames", "bytes"),
        "llm_bytes": fit_linear(_line("llm_mem", [100 + 36 * f for f in frames], noise, rng), "context", "bytes"),
    }
    model = ProfiledModel(label="x", preset=preset, backend=backend, recipe="8da4w", manifest_sha256=sha,
                          slowfast="slowfast-slow_32frms_spatial_2d_avg_pool-fast_6x6", max_context=16384, prefill_chunk=128,
                          encoder_batch=0, frame_counts=(16,), text_tokens=40, kv_dtype="fp32", kv_bytes_per_token=57344)
    machine = Machine(cpu="test", cores=2, threads=2, read_gb_s=30.0, copy_gb_s=40.0, matmul_gflop_s=200.0, hostname="h")
    return DeviceProfile(schema=SCHEMA, created="now", machine=machine, model=model, fits=fits, rss_start_bytes=100 << 20,
                         rss_loaded_bytes=1500 << 20, frames=tuple(frames), max_position=max_position)


def test_fit_recovers_known_coefficients():
    rng = random.Random(1)
    for name, (a, b) in TRUE.items():
        exact = fit_linear(_line(name, [1, 3, 7, 20]), "x", "y")
        assert exact.intercept == pytest.approx(a, rel=1e-9) and exact.slope == pytest.approx(b, rel=1e-9)
        assert exact.rms_residual == pytest.approx(0.0, abs=1e-6 * a)
        span = 4 * a / b  # x range where the slope term reaches 4x the constant
        noisy = fit_linear(_line(name, [span * i / 30 for i in range(1, 31)], 0.02, rng), "x", "y")  # +-2 % noise
        top = a + b * span
        assert noisy.slope == pytest.approx(b, rel=0.05) and noisy.intercept == pytest.approx(a, abs=0.02 * top)
        assert 0 < noisy.relative_rms < 0.03
    single = fit_linear([(8, 16.0)], "frames", "ms")
    assert (single.intercept, single.slope) == (0.0, 2.0) and "proportional" in single.note
    per_token = fit_linear([(300, 2.0)], "position", "ms_per_token", single_x="constant")
    assert (per_token.intercept, per_token.slope) == (2.0, 0.0)
    flat = fit_linear([(1, 5.0), (2, 4.0)], "p", "ms", nonnegative_slope=True)
    assert flat.slope == 0.0 and flat.intercept == 4.5


def _count_part(frames, model, rss_loaded=1500 << 20, extend=False):
    """What one profiler worker would report at ``frames`` on the TRUE machine (no noise)."""
    from sfedge.benchmarks.profiler import CountMeasurement

    context = 100 + 36 * frames
    positions = [p + 0.5 for p in range(0, 2 * context if extend else context, 128)]
    vision = TRUE["vision_mem"][0] + TRUE["vision_mem"][1] * frames
    held = [context + 8] + ([2 * context + 8] if extend else [])  # positions in the cache: prompt + decode steps (, continued)
    llm_points = _line("llm_mem", held)
    peak = (100 << 20) + max(vision, model.kv_bytes_per_token * held[0] + llm_points[0][1])  # from rss_start
    points = {"video": _line("video", [frames]), "encode": _line("encode", [1] * frames),
              "projector": _line("projector", [frames]), "prefill": _line("prefill", positions),
              "decode": _line("decode", [3.5, context + 3.5] + ([2 * context + 3.5] if extend else []))}
    row = {"frames": frames, "embed_ms": 2.0, "context": context, "peak_rss_bytes": peak}
    return CountMeasurement(model=model, threads=2, rss_start_bytes=100 << 20, rss_loaded_bytes=rss_loaded,
                            peak_rss_bytes=peak, vision_bytes=vision, llm_points=llm_points, max_position=(2 if extend else 1) * context + 8,
                            points=points, row=row)


def test_profile_merges_one_process_per_count():
    """The parent's fits over per-count worker results recover the true lines; a worker that saw another
    export is refused; the JSON round trip of a worker result is lossless."""
    from sfedge.benchmarks.cases import Source
    from sfedge.benchmarks.profiler import CountMeasurement, ProfileJob, count_jobs, fit_profile, measure

    model = synthetic_profile().model
    job = ProfileJob(source=Source(folder="/x/sf1b"), video="v.mp4", frames=(16, 4, 64))
    jobs = count_jobs(job)
    assert [(j.count, j.extend) for j in jobs] == [(4, False), (16, False), (64, True)]
    parts = [_count_part(j.count, model, extend=j.extend) for j in jobs]
    sent = []
    profile = measure(job, lambda d: sent.append(d["count"]) or CountMeasurement.from_dict(
        json.loads(json.dumps(parts[len(sent) - 1].to_dict()))).to_dict())
    assert sent == [4, 16, 64] and profile.frames == (4, 16, 64) and profile.max_position == 2 * (100 + 36 * 64) + 8
    for name, key in (("vision_mem", "vision_bytes"), ("llm_mem", "llm_bytes"), ("prefill", "prefill_ms_per_token"), ("projector", "projector_ms"),
                      ("decode", "decode_ms_per_token"), ("video", "video_ms")):
        fit = profile.fits[key]
        assert (fit.intercept, fit.slope) == (pytest.approx(TRUE[name][0], rel=1e-6), pytest.approx(TRUE[name][1], rel=1e-6))
    assert profile.rss_loaded_bytes == 1500 << 20
    # the prediction at a profiled count gives back that worker's peak
    assert predict(profile, 16, 36 * 16, model.slowfast, 100, gen_tokens=8).peak_rss_bytes == pytest.approx(parts[1].peak_rss_bytes)
    other = dataclasses.replace(parts[1], model=dataclasses.replace(model, manifest_sha256="cd" * 32))
    with pytest.raises(SfedgeError, match="different exports"):
        fit_profile(job, [parts[0], other])
    with pytest.raises(SfedgeError, match="at 4 frames failed: boom"):
        measure(job, lambda d: {"status": "failed", "note": "boom"})


def test_prediction_adds_up_the_stages():
    profile = synthetic_profile()
    p = predict(profile, frames=16, visual_tokens=800, slowfast="s", text_tokens=40, gen_tokens=32)
    a, b = TRUE["prefill"]
    assert prefill_ms(profile.fits["prefill_ms_per_token"], 840) == pytest.approx(sum(a + b * i for i in range(840)))
    assert p.stages_ms["vision_encode"] == pytest.approx(3.0 + 40.0 * 16)  # one dynamic-batch call
    assert p.ttft_ms == pytest.approx(sum(p.stages_ms.values()))
    assert p.decode_tokens_per_s == pytest.approx(1000 / (20.0 + 0.002 * 840))
    # peak = loaded + the larger phase: here the LLM's (KV of 872 positions + its buffers) ...
    assert p.peak_rss_bytes == pytest.approx((100 << 20) + 57344 * 872 + 300e6 + 30e3 * 872, rel=1e-6)
    # ... and at 128 frames with a short prompt the vision phase's (frames, features, projector)
    short = predict(profile, frames=128, visual_tokens=100, slowfast="s", text_tokens=40, gen_tokens=1)
    assert short.peak_rss_bytes == pytest.approx((100 << 20) + 50e6 + 9e6 * 128, rel=1e-6)
    static = dataclasses.replace(profile, model=dataclasses.replace(profile.model, encoder_batch=4))
    assert predict(static, 10, 800, "s").stages_ms["vision_encode"] == pytest.approx(3 * (3.0 + 40.0 * 4))  # 3 padded calls


def test_llm_memory_follows_the_context_not_the_frames():
    """Schema 3: the LLM phase's buffers (attention over the cache, like the cache itself) grow with the
    positions held, so at one frame count a spec with 4,000 more visual tokens needs their KV cache and their
    buffers (a line in frames, schema 2, gave the same buffers to both)."""
    profile = synthetic_profile()
    few = predict(profile, frames=16, visual_tokens=800, slowfast="s", text_tokens=40, gen_tokens=32)
    many = predict(profile, frames=16, visual_tokens=4800, slowfast="s", text_tokens=40, gen_tokens=32)
    assert many.peak_rss_bytes - few.peak_rss_bytes == pytest.approx((57344 + TRUE["llm_mem"][1]) * 4000, rel=1e-6)
    assert profile.fits["llm_bytes"].x == "context"


def test_extrapolation_is_flagged():
    profile = synthetic_profile(frames=(4, 16), max_position=1000)
    assert predict(profile, 8, 300, "s").warnings == ()
    far = predict(profile, 128, 9216, "s")
    assert any("outside the profiled 4-16" in w for w in far.warnings)
    assert any("past the profiled position 1000" in w for w in far.warnings)
    assert far.extrapolated


def test_plan_ranks_by_visual_tokens_and_filters():
    profiles = [("et.json", synthetic_profile()), ("onnx.json", synthetic_profile(backend="onnx"))]
    ranked = candidates(profiles, max_ttft_ms=parse_duration_ms("5s", "--max-ttft"), max_rss_bytes=parse_bytes("3GiB", "--max-rss"))
    fitting = [c for c in ranked if c.fits]
    assert fitting and len(fitting) < len(ranked)
    assert ranked[:len(fitting)] == fitting  # fitting first
    tokens = [c.prediction.visual_tokens for c in fitting]
    assert tokens == sorted(tokens, reverse=True)
    assert all(c.prediction.ttft_ms <= 5000 and c.prediction.peak_rss_bytes <= 3 * 2**30 for c in fitting)
    assert all(("TTFT" in c.reason or "RSS" in c.reason or "context" in c.reason) for c in ranked if not c.fits)
    assert {c.prediction.backend for c in ranked} == {"executorch", "onnx"}
    with pytest.raises(UsageError, match="--max-ttft"):
        parse_duration_ms("fast", "--max-ttft")
    assert parse_bytes("800MiB", "--max-rss") == 800 * 2**20


def test_plan_cli_is_light(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(synthetic_profile().to_json())
    code = ("import sys; from sfedge.cli import main; "
            f"rc = main(['plan', '--profile', {str(path)!r}, '--max-ttft', '10s', '--max-rss', '3GiB', '--model', "
            f"'sf-llava-1.5-1b', '--plot', {str(tmp_path / 'plan.png')!r}]); "
            "assert 'torch' not in sys.modules, 'plan imported torch'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "candidates fit TTFT <= 10 s" in done.stdout and (tmp_path / "plan.png").stat().st_size > 0
    assert main(["plan", "--profile", str(path), "--model", "tiny", "--no-plot"]) == 1  # another preset: refused


def test_profile_round_trip_and_bad_files(tmp_path, capsys):
    path = tmp_path / "p.json"
    profile = synthetic_profile()
    path.write_text(profile.to_json())
    assert load_profile(str(path)) == profile
    path.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(SfedgeError, match="not an sfedge device profile"):
        load_profile(str(path))
    path.write_text(json.dumps({**profile.to_dict(), "schema": "sfedge-device-profile/1"}))
    with pytest.raises(SfedgeError, match=r"another format \(sfedge-device-profile/1; .*measure it again"):
        load_profile(str(path))
    # a /2 profile (its LLM memory line in frames) is read and evaluated in frames, as it was written
    old = profile.to_dict()
    old["fits"]["llm_bytes"] = {**old["fits"]["llm_bytes"], "x": "frames", "intercept": 300e6, "slope": 1e6}
    path.write_text(json.dumps({**old, "schema": "sfedge-device-profile/2"}))
    at_16 = predict(load_profile(str(path)), frames=16, visual_tokens=800, slowfast="s", text_tokens=40, gen_tokens=32)
    assert at_16.peak_rss_bytes == pytest.approx((100 << 20) + 57344 * 872 + 300e6 + 1e6 * 16, rel=1e-6)
    path.write_text(json.dumps({**profile.to_dict(), "fits": {**old["fits"], "llm_bytes": {**old["fits"]["llm_bytes"], "x": "ms"}}}))
    with pytest.raises(SfedgeError, match="llm_bytes line is in 'ms'"):
        load_profile(str(path))
    path.write_text(profile.to_json())
    assert main(["budget", "--model", "sf-llava-1.5-1b", "--frames", "128", "--profile", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    prediction = data["prediction"]
    assert data["visual_tokens"] == prediction["visual_tokens"] == 9216 and prediction["extrapolated"]
    assert prediction["ttft_ms"] == pytest.approx(sum(prediction["stages_ms"].values()))
    assert main(["budget", "--model", "sf-llava-1.5-1b", "--frames", "8", "--profile", str(path)]) == 0
    text = capsys.readouterr().out
    # 8 frames, v1 SlowFast: 32 slow frames (repeated) x 144 + 8 x 36 = 4,896 visual tokens + the template's text
    assert "TTFT" in text and "peak RSS" in text and "EXTRAPOLATED     context 4923 is past the profiled position 1000" in text
    assert main(["budget", "--model", "tiny", "--profile", str(tmp_path / "missing.json")]) == 1
    assert "cannot read device profile" in capsys.readouterr().err


@pytest.mark.slow
def test_profile_of_another_backend_or_export_is_refused(tiny_onnx, tmp_path, capsys):
    from sfedge.benchmarks.costmodel import manifest_sha256

    right = dataclasses.replace(synthetic_profile(preset="tiny", backend="onnx", sha=manifest_sha256(str(tiny_onnx))))
    check_applies_to_folder(right, str(tiny_onnx), None)
    other_backend = dataclasses.replace(right, model=dataclasses.replace(right.model, backend="executorch"))
    with pytest.raises(SfedgeError, match="measured on backend executorch, not onnx"):
        check_applies_to_folder(other_backend, str(tiny_onnx), None)
    other_export = dataclasses.replace(right, model=dataclasses.replace(right.model, manifest_sha256="cd" * 32))
    path = tmp_path / "other.json"
    path.write_text(other_export.to_json())
    assert main(["bench", str(tiny_onnx), "--validate", str(path), "--no-limits", "-r", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "measured on another export" in err[0]


@pytest.mark.slow
def test_profile_and_validate_tiny_onnx(tiny_onnx, demo_video, tmp_path, capsys):
    """A real profile of a tiny ONNX export at 2 and 8 frames, then --validate at 8 frames."""
    path = tmp_path / "device.json"
    common = ["--threads", "1", "--no-limits", "--video", str(demo_video)]
    assert main(["bench", str(tiny_onnx), "--profile-out", str(path), "--frames", "2,8", "-r", "2", *common]) == 0
    profile = load_profile(str(path))
    assert profile.model.backend == "onnx" and profile.frames == (2, 8) and profile.model.prefill_chunk == 64
    assert profile.fits["encode_call_ms"].slope > 0 and profile.max_position > 8 * 4
    # one process per count: position 0 and the count's context in each, twice the largest context in the last
    assert len(profile.fits["decode_ms_per_token"].points) == 5 and len(profile.fits["prefill_ms_per_token"].points) >= 2
    assert [row["frames"] for row in profile.measured] == [2, 8] and "projector_ms" in profile.measured[1]
    assert "| prefill_ms_per_token |" in capsys.readouterr().out
    assert main(["bench", str(tiny_onnx), "--validate", str(path), "-r", "1", "--gen-tokens", "8", "--output", "json",
                 "--out", str(tmp_path / "b.json"), *common]) == 0
    table = capsys.readouterr().out
    for stage in ("vision_encode", "prefill", "TTFT", "decode", "peak RSS"):
        assert f"| tiny_onnx_fp32 f8+tg8+t1 | {stage} |" in table
    # the same table from the stored results, without running anything; a profile of another model is refused
    assert main(["bench", "--validate", str(path), "--results", str(tmp_path / "b.json")]) == 0
    stored = capsys.readouterr().out
    assert stored.strip() and stored.strip() in table
    other = tmp_path / "other.json"
    other.write_text(synthetic_profile().to_json())
    assert main(["bench", "--validate", str(other), "--results", str(tmp_path / "b.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ran tiny onnx fp32, but" in err[0] and "sf-llava-1.5-1b executorch 8da4w" in err[0]
