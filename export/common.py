"""What every exporter shares: an atomic output folder, stage progress, manifest entries."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from sfedge.errors import SfedgeError
from sfedge.manifest import ArtifactEntry, TensorSpec, path_bytes, sha256_path


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``out_dir`` only when the block succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SfedgeError(f"output folder {out_dir} already exists; pass --overwrite or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class Progress:
    """One line per stage on stderr: ``[export] vision_encoder: lower ... 12.3 s``."""

    def __init__(self, prefix: str = "export", stream=None, enabled: bool = True):
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, component: str, stage: str) -> Iterator[None]:
        if self.enabled:
            print(f"[{self.prefix}] {component}: {stage} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.timings[f"{component}.{stage}"] = round(elapsed, 3)
        if self.enabled:
            print(f"[{self.prefix}] {component}: {stage} done in {elapsed:.1f} s", file=self.stream, flush=True)


def artifact_entry(folder: Path, component: str, file: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                   quantization: dict, method: str | None = None, **extra) -> ArtifactEntry:
    path = Path(folder) / file
    return ArtifactEntry(component=component, file=file, sha256=sha256_path(path), bytes=path_bytes(path),
                         inputs=list(inputs), outputs=list(outputs), quantization=quantization, method=method,
                         extra=dict(extra))


def projector_frame_counts(default_frames: int, extra_frames: Sequence[int]) -> list:
    """The frame counts to export a projector for: the config's first, then the extra ones, no repeats."""
    return list(dict.fromkeys([default_frames, *extra_frames]))


def projector_stem(frames: int, default_frames: int) -> str:
    """``projector`` for the default frame count, ``projector_f32`` for an extra one (32 frames)."""
    return "projector" if frames == default_frames else f"projector_f{frames}"
