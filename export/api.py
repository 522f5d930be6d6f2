"""export_model(): check the memory, build the model (or hand a part-by-part exporter an empty one), run one
backend's exporter into a temp folder, write the tokenizer and the manifest (with every stage's seconds and
peak RSS), rename. Backends register an exporter in EXPORTERS."""
from __future__ import annotations

import datetime
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from sfedge import __version__
from sfedge.budget import compute_budget, template_text_tokens
from sfedge.config import ModelConfig
from sfedge.errors import UsageError
from sfedge.manifest import TOKENIZER_FILE, ArtifactEntry, Manifest, sha256_file
from sfedge.models import SFLlava, WeightsSource, build_model, empty_model, resolve_config
from sfedge.quantize.recipes import Recipe, get_recipe
from sfedge.registry import Registry
from sfedge.tokenizer import load_tokenizer
from sfedge.export.common import (
    Progress, atomic_output_dir, build_parts_lazily, check_output_dir, projector_frame_counts, record_kv_dtype,
)
from sfedge.export.memory_estimate import check_memory, estimate_export_peak
from sfedge.memory import peak_rss


@dataclass(frozen=True)
class ExportOptions:
    backend: str
    recipe: str = "fp32"
    max_context: Optional[int] = None  # KV-cache length; default: the budget's prompt + 512 new tokens
    prefill_chunk: int = 128  # the largest T the text decoder takes at once
    encoder_batch: int = 1  # frames per vision-encoder call (static)
    overwrite: bool = False
    show_progress: bool = True
    coreml_target: str = "iOS18"  # Core ML minimum deployment target of the stateless packages (the LLM is always iOS18)
    extra_frames: Tuple[int, ...] = ()  # more frame counts to export a projector for (one folder serves a frame sweep)
    kv_layout: str = "gqa-inplace"  # onnx: decoder KV layout, gqa-inplace or past-present (transformers.js)
    calibration_video: Optional[str] = None  # onnx static int8 vision encoder: calibrate on this video's frames
    memory_check: bool = True  # refuse up front an export whose estimated peak RSS exceeds the memory available
    parallel_parts: bool = True  # executorch: vision encoder + projectors in a second process beside the LLM (if memory allows)


Exporter = Callable[[SFLlava, ExportOptions, Recipe, Path, Progress], List[ArtifactEntry]]
EXPORTERS: Registry[Exporter] = Registry("export backend")
# Exporters that fill the model one part at a time (export.common.model_part); the others get it built whole.
PART_BY_PART: set = set()


def default_max_context(config: ModelConfig, text_tokens: int, new_tokens: int = 512, multiple: int = 256) -> int:
    budget = compute_budget(config, text_tokens, max_new_tokens=new_tokens)
    rounded = -(-budget.total_tokens // multiple) * multiple
    return min(rounded, config.llm.max_context)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def library_versions() -> dict:
    from importlib import metadata

    versions = {}
    for name in ("torch", "executorch", "torchao", "onnx", "onnxruntime", "coremltools", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _ensure_backend_loaded(backend: str) -> None:
    """Exporters register on import; import only the one asked for (optional dependencies)."""
    import importlib

    from sfedge.backends import BACKENDS

    module = BACKENDS[backend].exporter_module if backend in BACKENDS else None
    if module and backend not in EXPORTERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("sfedge"):
                raise UsageError(f"export backend {backend!r} is not available in this build") from None
            raise


def export_model(config: ModelConfig, weights: WeightsSource, options: ExportOptions, out_dir: Path) -> Manifest:
    out_dir = check_output_dir(out_dir, options.overwrite)  # before any work: the model build takes minutes at 3B
    _ensure_backend_loaded(options.backend)
    exporter = EXPORTERS.get(options.backend)
    recipe = get_recipe(options.backend, options.recipe)
    config = resolve_config(config, weights)
    tokenizer = load_tokenizer(config, weights.llm_dir)
    text_tokens = template_text_tokens(config, llm_dir=weights.llm_dir)
    frame_counts = projector_frame_counts(config.slowfast.frames, options.extra_frames)
    for frames in frame_counts:
        config.with_slowfast(frames)  # every frame count must be valid for the SlowFast spec
    largest = max(frame_counts)
    max_context = options.max_context or default_max_context(config.with_slowfast(largest), text_tokens)
    if max_context > config.llm.max_context:
        raise UsageError(f"--max-context {max_context} exceeds model {config.name}'s context of {config.llm.max_context}")
    prompt_tokens = compute_budget(config, text_tokens, frames=largest).prompt_tokens
    if max_context <= prompt_tokens:
        raise UsageError(
            f"--max-context {max_context} cannot hold the {prompt_tokens}-token prompt of {largest} frames "
            f"({config.slowfast.spec}); pass --max-context above {prompt_tokens} or fewer --frames")
    if options.prefill_chunk < 1 or options.prefill_chunk >= max_context:
        raise UsageError(f"--prefill-chunk must be in [1, {max_context - 1}], got {options.prefill_chunk}")
    options = ExportOptions(**{**asdict(options), "max_context": max_context})
    if options.memory_check:  # before the output folder exists: a refused export leaves nothing behind
        estimate = estimate_export_peak(empty_model(config, weights, max_context), options.backend, options.recipe)
        available = check_memory(estimate)
    with Progress(enabled=options.show_progress) as progress, atomic_output_dir(out_dir, options.overwrite) as tmp:
        if options.memory_check and options.show_progress:
            print(f"[export] memory: estimated peak {estimate.describe()}; {available.describe()}", file=sys.stderr, flush=True)
        if options.backend in PART_BY_PART:  # the exporter fills (and frees) one part at a time
            model = build_model(config, weights, max_context, fill=False)
            build_parts_lazily(model, weights)
        else:
            with progress.stage("model", "build"):
                model = build_model(config, weights, max_context)
        entries = exporter(model, options, recipe, tmp, progress)
        record_kv_dtype(model, entries, tmp)
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        manifest = Manifest(
            backend=options.backend, recipe=recipe.name, preset=config.name, model_config=config.to_dict(),
            weights={**weights.to_dict(), "fingerprint": weights.fingerprint()},
            token_budget=compute_budget(config, text_tokens, context=max_context).to_dict(),
            export_options={**asdict(options), "frames": config.slowfast.frames, "frame_counts": frame_counts,
                            "prompt_tokens_by_frames": {str(f): compute_budget(config, text_tokens, frames=f).prompt_tokens
                                                        for f in frame_counts},
                            "stage_seconds": progress.timings},
            tokenizer={"file": TOKENIZER_FILE, "sha256": sha256_file(tmp / TOKENIZER_FILE), "kind": config.tokenizer,
                       "special_tokens": dict(config.llm.special_tokens), "eos_ids": list(config.llm.eos_ids)},
            components=entries, sfedge_version=__version__, git_commit=_git_commit(),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            library_versions=library_versions(), stages=progress.records,
            export_peak_rss_bytes=max(peak_rss(), progress.tree_peak),  # with a part in a child process: both summed
        )
        manifest.write(tmp)
    return manifest
