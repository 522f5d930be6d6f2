"""Device profiles: a cost model of one artifact folder (or eager preset) on one machine, fitted from
timings measured at a few frame counts and context positions, and the predictions made from it.

Pure Python (no torch, no numpy): `sfedge plan` and `sfedge budget --profile` load it in well under
a second. Measuring a profile lives in benchmarks/profiler.py. See docs/cost_model.md.

The model, stage by stage (x = what the stage's cost grows with):
- video: decode + sample + resize + normalise, ms = a + b x frames
- vision encode: ms per encoder call = a + b x frames in the call; a static encoder batch B runs
  ceil(N / B) calls of B frames (the last one padded), a dynamic one runs one call of N
- projector: ms = a + b x frames
- embed: the prompt text's embedding, a constant
- prefill: ms per token at position p = a + b x p (the b term is attention over the cache), so a
  prompt of L tokens costs L a + b L (L - 1) / 2, whatever the chunking
- decode: ms per token at position p = a + b x p; tok/s at context c = 1000 / (a + b c)
- peak RSS = RSS before the folder is opened (interpreter + imports) + the larger of the two phases'
  needs: the vision phase (artifacts loaded so far, frames, pixels, features, the projector's buffers:
  a + b x frames) and the LLM phase (artifacts, KV bytes per token x context, the prefill's buffers:
  a + b x context, context = the positions in the KV cache). The KV bytes per token come from the
  manifest's kv_dtype; both lines are fitted on each phase's measured peak in a fresh process per
  profiled count (the LLM line also on the largest count's prefill continued to twice its context).
  (Not RSS after load: backends load lazily and opening a folder has transient peaks.)
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from sfedge.errors import SfedgeError

# 2: the memory model has a vision and an LLM phase; 3: the LLM phase's line is in the context, not in frames
SCHEMA = "sfedge-device-profile/3"
# a /2 profile is still read: its llm_bytes line says x = "frames" and is evaluated there, as when it was written
READABLE_SCHEMAS = (SCHEMA, "sfedge-device-profile/2")
LLM_MEMORY_X = ("frames", "context")  # what the llm_bytes line of a readable profile may be a line in
KV_BYTES_PER_VALUE = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "int8": 1}
EXTRAPOLATION_SLACK = 1.05  # up to 5 % past the measured range still counts as measured


@dataclass(frozen=True)
class LinearFit:
    """y = intercept + slope x, least squares over ``points``; residuals in y's unit."""

    intercept: float
    slope: float
    x: str  # what x holds, e.g. "frames", "position"
    y: str  # what y holds, e.g. "ms", "ms_per_token"
    x_min: float
    x_max: float
    rms_residual: float
    max_abs_residual: float
    points: Tuple[Tuple[float, float], ...]
    note: str = ""  # e.g. "one point: proportional"

    def __call__(self, x: float) -> float:
        return self.intercept + self.slope * x

    def extrapolates(self, x: float) -> bool:
        return x > self.x_max * EXTRAPOLATION_SLACK or x < self.x_min / EXTRAPOLATION_SLACK

    @property
    def relative_rms(self) -> float:
        mean = sum(abs(y) for _, y in self.points) / max(len(self.points), 1)
        return self.rms_residual / mean if mean else 0.0

    @staticmethod
    def from_dict(data: dict) -> "LinearFit":
        return LinearFit(**{**data, "points": tuple(tuple(p) for p in data["points"])})


def fit_linear(points: Sequence[Tuple[float, float]], x: str, y: str, nonnegative_slope: bool = False,
               single_x: str = "proportional") -> LinearFit:
    """Least-squares line. One distinct x: y proportional to x (``single_x="proportional"``, e.g. time vs
    frames) or constant (``"constant"``, e.g. time per token vs position), with a note saying so.
    ``nonnegative_slope``: a fitted negative slope (noise on a flat cost) becomes a constant (the mean)."""
    pts = [(float(px), float(py)) for px, py in points]
    if not pts:
        raise SfedgeError(f"no measurements to fit {y} vs {x}")
    n = len(pts)
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((px - mx) ** 2 for px in xs)
    note = ""
    if sxx == 0 and single_x == "constant":
        slope, intercept, note = 0.0, my, "one x value: constant"
    elif sxx == 0:
        slope = my / mx if mx else 0.0
        intercept = 0.0 if mx else my
        note = "one x value: proportional" if mx else "one x value: constant"
    else:
        slope = sum((px - mx) * (py - my) for px, py in pts) / sxx
        intercept = my - slope * mx
        if nonnegative_slope and slope < 0:
            slope, intercept, note = 0.0, my, "negative slope fitted: constant"
    residuals = [py - (intercept + slope * px) for px, py in pts]
    return LinearFit(intercept=intercept, slope=slope, x=x, y=y, x_min=min(xs), x_max=max(xs),
                     rms_residual=math.sqrt(sum(r * r for r in residuals) / n),
                     max_abs_residual=max(abs(r) for r in residuals), points=tuple(pts), note=note)


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int  # logical CPUs the OS reports
    threads: int  # threads the profile ran with
    read_gb_s: float
    copy_gb_s: float
    matmul_gflop_s: float
    hostname: str


@dataclass(frozen=True)
class ProfiledModel:
    """What the profile was measured on: refused when applied to anything else."""

    label: str  # folder name or preset@eager
    preset: str  # the model config's name
    backend: str
    recipe: str
    manifest_sha256: str  # "" for an eager preset
    slowfast: str
    max_context: int
    prefill_chunk: int
    encoder_batch: int  # 0: any batch
    frame_counts: Tuple[int, ...]  # the projectors' static frame counts; () when any count works
    text_tokens: int  # template + default question
    kv_dtype: str
    kv_bytes_per_token: int


@dataclass(frozen=True)
class DeviceProfile:
    schema: str
    created: str
    machine: Machine
    model: ProfiledModel
    fits: Dict[str, LinearFit]  # FIT_NAMES
    rss_start_bytes: int
    rss_loaded_bytes: int
    frames: Tuple[int, ...]  # the frame counts measured
    max_position: int  # the largest context position measured
    measured: Tuple[dict, ...] = ()  # per frame count: measured stage times and peak RSS (plotted by `sfedge plan`)
    provenance: dict = field(default_factory=dict)

    @property
    def resident_bytes(self) -> int:
        return self.rss_loaded_bytes - self.rss_start_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @staticmethod
    def from_dict(data: dict) -> "DeviceProfile":
        model = dict(data["model"])
        model["frame_counts"] = tuple(model["frame_counts"])
        return DeviceProfile(
            schema=data["schema"], created=data["created"], machine=Machine(**data["machine"]),
            model=ProfiledModel(**model), fits={k: LinearFit.from_dict(v) for k, v in data["fits"].items()},
            rss_start_bytes=int(data["rss_start_bytes"]), rss_loaded_bytes=int(data["rss_loaded_bytes"]),
            frames=tuple(data["frames"]), max_position=int(data["max_position"]),
            measured=tuple(data.get("measured", ())), provenance=data.get("provenance", {}))


FIT_NAMES = ("video_ms", "encode_call_ms", "projector_ms", "embed_ms", "prefill_ms_per_token", "decode_ms_per_token",
             "vision_bytes", "llm_bytes")


def load_profile(path: str) -> DeviceProfile:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SfedgeError(f"cannot read device profile {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SfedgeError(f"device profile {path} is not valid JSON ({exc})") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if isinstance(schema, str) and schema.startswith(SCHEMA.split("/")[0] + "/") and schema not in READABLE_SCHEMAS:
        raise SfedgeError(f"{path} is a device profile of another format ({schema}; this sfedge reads "
                          f"{' and '.join(READABLE_SCHEMAS)}); measure it again with `sfedge bench DIR --profile-out FILE`")
    if schema not in READABLE_SCHEMAS:
        raise SfedgeError(f"{path} is not an sfedge device profile (expected schema {SCHEMA!r}); "
                          "write one with `sfedge bench DIR --profile-out FILE`")
    try:
        profile = DeviceProfile.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise SfedgeError(f"device profile {path} is incomplete or malformed ({type(exc).__name__}: {exc})") from None
    missing = [name for name in FIT_NAMES if name not in profile.fits]
    if missing:
        raise SfedgeError(f"device profile {path} lacks the fits {', '.join(missing)}")
    if profile.fits["llm_bytes"].x not in LLM_MEMORY_X:
        raise SfedgeError(f"device profile {path}: its llm_bytes line is in {profile.fits['llm_bytes'].x!r}, "
                          f"not one of {', '.join(LLM_MEMORY_X)}")
    return profile


def manifest_sha256(folder: str) -> str:
    try:
        return hashlib.sha256((Path(folder) / "manifest.json").read_bytes()).hexdigest()
    except OSError as exc:
        raise SfedgeError(f"cannot read {Path(folder) / 'manifest.json'}: {exc.strerror}") from None


def check_applies_to_folder(profile: DeviceProfile, folder: str, backend: Optional[str], path: str = "the profile") -> None:
    """One-line refusal when a profile was measured on another backend or another export."""
    from sfedge.manifest import read_manifest

    manifest = read_manifest(folder)
    actual = backend or manifest.backend
    if profile.model.backend != actual:
        raise SfedgeError(f"{path} was measured on backend {profile.model.backend}, not {actual} ({folder}); "
                          f"profile this folder with `sfedge bench {folder} --profile-out FILE`")
    digest = manifest_sha256(folder) if actual != "eager" else ""
    if profile.model.manifest_sha256 != digest:
        raise SfedgeError(f"{path} was measured on another export (manifest sha256 {profile.model.manifest_sha256[:12] or 'none'}, "
                          f"{folder} has {digest[:12] or 'none'}); profile this folder with `sfedge bench {folder} --profile-out FILE`")


def check_applies_to_preset(profile: DeviceProfile, preset: str, path: str = "the profile") -> None:
    if profile.model.preset != preset:
        raise SfedgeError(f"{path} was measured on {profile.model.preset} ({profile.model.label}), not {preset}")


# --- prediction ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    label: str
    backend: str
    recipe: str
    frames: int
    slowfast: str
    visual_tokens: int
    prompt_tokens: int
    stages_ms: Dict[str, float]  # video, vision_encode, projector, embed, prefill
    ttft_ms: float
    decode_tokens_per_s: float  # at the context after the prompt
    decode_ms: float  # the gen_tokens - 1 steps after the first token
    peak_rss_bytes: int
    warnings: Tuple[str, ...]

    @property
    def extrapolated(self) -> bool:
        return bool(self.warnings)

    def to_dict(self) -> dict:
        return {**asdict(self), "extrapolated": self.extrapolated}


def prefill_ms(fit: LinearFit, tokens: int, start: int = 0) -> float:
    """Sum over positions start .. start + tokens - 1 of a + b p."""
    return tokens * fit.intercept + fit.slope * (tokens * start + tokens * (tokens - 1) / 2)


def encode_ms(fit: LinearFit, frames: int, encoder_batch: int) -> float:
    if not encoder_batch:
        return fit(frames)
    calls = math.ceil(frames / encoder_batch)
    return calls * fit(encoder_batch)


def predict(profile: DeviceProfile, frames: int, visual_tokens: int, slowfast: str, text_tokens: Optional[int] = None,
            gen_tokens: int = 32) -> Prediction:
    """Stage times, TTFT, decode rate and peak RSS for ``frames`` frames giving ``visual_tokens``
    visual tokens (from sfedge.budget); warnings name every quantity outside the measured range."""
    fits, model = profile.fits, profile.model
    text = model.text_tokens if text_tokens is None else text_tokens
    prompt = visual_tokens + text
    context = prompt + max(gen_tokens, 1)
    warnings: List[str] = []
    if frames > max(profile.frames) * EXTRAPOLATION_SLACK or frames < min(profile.frames) / EXTRAPOLATION_SLACK:
        warnings.append(f"{frames} frames is outside the profiled {min(profile.frames)}-{max(profile.frames)}")
    if context > profile.max_position * EXTRAPOLATION_SLACK:
        warnings.append(f"context {context} is past the profiled position {profile.max_position}")
    if context > model.max_context:
        warnings.append(f"context {context} does not fit the {model.label} context of {model.max_context}")
    stages = {
        "video": fits["video_ms"](frames),
        "vision_encode": encode_ms(fits["encode_call_ms"], frames, model.encoder_batch),
        "projector": fits["projector_ms"](frames),
        "embed": fits["embed_ms"](text),
        "prefill": prefill_ms(fits["prefill_ms_per_token"], prompt),
    }
    stages = {name: max(value, 0.0) for name, value in stages.items()}
    decode_fit = fits["decode_ms_per_token"]
    first_step = max(decode_fit(prompt), 1e-9)
    decode_total = prefill_ms(decode_fit, max(gen_tokens - 1, 0), prompt)
    vision_phase = max(fits["vision_bytes"](frames), 0.0)
    llm_x = {"frames": frames, "context": context}[fits["llm_bytes"].x]  # "frames": a schema-2 profile
    llm_phase = model.kv_bytes_per_token * context + max(fits["llm_bytes"](llm_x), 0.0)
    peak = profile.rss_start_bytes + max(vision_phase, llm_phase)
    return Prediction(label=model.label, backend=model.backend, recipe=model.recipe, frames=frames, slowfast=slowfast,
                      visual_tokens=visual_tokens, prompt_tokens=prompt, stages_ms=stages, ttft_ms=sum(stages.values()),
                      decode_tokens_per_s=1000.0 / first_step, decode_ms=decode_total, peak_rss_bytes=int(peak),
                      warnings=tuple(warnings))


def predict_for_config(profile: DeviceProfile, config, text_tokens: Optional[int] = None, gen_tokens: int = 32) -> Prediction:
    """``config``: an sfedge.config.ModelConfig with the frames and SlowFast spec to predict."""
    from sfedge.budget import visual_token_counts

    _, slow, fast = visual_token_counts(config, config.slowfast.frames)
    return predict(profile, config.slowfast.frames, slow + fast, config.slowfast.spec, text_tokens, gen_tokens)


def format_prediction(prediction: Prediction, profile_path: str = "") -> str:
    rows = [("predicted from", f"{profile_path} ({prediction.label}, {prediction.backend} {prediction.recipe})")]
    rows += [(f"  {name}", f"{ms:,.1f} ms") for name, ms in prediction.stages_ms.items()]
    rows += [("TTFT", f"{prediction.ttft_ms:,.1f} ms"),
             ("decode", f"{prediction.decode_tokens_per_s:,.1f} tok/s at context {prediction.prompt_tokens:,}"),
             ("peak RSS", f"{prediction.peak_rss_bytes / 2**20:,.0f} MiB")]
    rows += [("EXTRAPOLATED", warning) for warning in prediction.warnings]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def budget_with_prediction(profile_path: str, config, budget, as_json: bool) -> str:
    """`sfedge budget --profile FILE`: the token table plus the prediction (text or JSON)."""
    from sfedge.budget import format_budget

    profile = load_profile(profile_path)
    check_applies_to_preset(profile, config.name, profile_path)
    prediction = predict(profile, budget.frames, budget.visual_tokens, budget.slowfast, budget.text_tokens,
                         max(budget.max_new_tokens, 1))
    if as_json:
        return json.dumps({**budget.to_dict(), "prediction": {**prediction.to_dict(), "profile": profile_path}}, indent=2)
    return format_budget(budget) + "\n" + format_prediction(prediction, profile_path)
