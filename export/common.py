"""What every exporter shares: an atomic output folder, stage progress, manifest entries."""
from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Iterator, List, Sequence

from sfedge.errors import SfedgeError, UsageError
from sfedge.manifest import MANIFEST_FILE, ArtifactEntry, StageRecord, TensorSpec, path_bytes, sha256_file, sha256_path
from sfedge.memory import GiB, RssSampler, StageMeter, gib


PARTIAL_MARK = ".partial-"
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def check_output_dir(out_dir, overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse an output folder that cannot be written, before any work: empty, an existing folder without
    ``overwrite``, a folder that is not an sfedge export (no manifest.json and not empty), a file, a
    parent that is a file or not writable. Returns the folder as a Path."""
    if out_dir is None or str(out_dir).strip() == "":
        raise UsageError(f"{flag} is empty: name the output folder")
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise UsageError(f"{flag} {out_dir} exists and is not a folder")
        if not overwrite:
            raise UsageError(f"output folder {out_dir} already exists; pass --overwrite or choose another {flag}")
        if not (out_dir / MANIFEST_FILE).is_file() and any(out_dir.iterdir()):
            raise UsageError(f"refusing to replace {out_dir}: it has no {MANIFEST_FILE}, so it is not an sfedge export "
                             f"(remove it yourself or choose another {flag})")
        if out_dir.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
            raise UsageError(f"refusing to replace {out_dir}: it is the current folder or one of its parents")
    parent = out_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {out_dir}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out_dir}: {parent} is not writable")
    return out_dir


def reclaim_stale(parent: Path) -> list:
    """Remove ``.NAME.partial-PID-*`` folders whose exporting process is gone (a SIGKILLed export), and put
    back a ``.NAME.old-PID`` folder left between the two renames of an interrupted ``--overwrite``."""
    reclaimed = []
    try:
        children = list(Path(parent).iterdir())
    except OSError:
        return reclaimed
    for child in children:
        partial, old = _PARTIAL.match(child.name), _OLD.match(child.name)
        match = partial or old
        if not match or not child.is_dir() or child.is_symlink() or _pid_alive(int(match.group("pid"))):
            continue
        target = child.with_name(match.group("name"))
        if old and not target.exists():
            child.rename(target)  # the last complete export, moved aside when the process died
        else:
            shutil.rmtree(child, ignore_errors=True)
        reclaimed.append(child)
    return reclaimed


class Terminated(KeyboardInterrupt):
    """SIGTERM during an export: unwinds like Ctrl-C, so the temporary folder is removed."""


@contextlib.contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises ``Terminated`` (a KeyboardInterrupt); the previous handler is restored
    after. Only the main thread can install signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder ``.NAME.partial-PID-*``; rename it to ``out_dir`` only when the block
    succeeds. Stale temporary folders of dead processes in the same parent are reclaimed first; SIGTERM
    unwinds like SIGINT; a failed rename during ``overwrite`` puts the old folder back."""
    out_dir = check_output_dir(out_dir, overwrite)
    created = [p for p in [out_dir.parent, *out_dir.parent.parents] if not p.exists()]
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        reclaim_stale(out_dir.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{PARTIAL_MARK}{os.getpid()}-", dir=out_dir.parent))
    except OSError as exc:
        _remove_empty(created)
        raise SfedgeError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from None
    try:
        with terminate_like_interrupt():
            yield tmp
            _move_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not out_dir.exists():
            _remove_empty(created)  # parents this export created, when it failed


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        _rename(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    _rename(out_dir, old)
    try:
        _rename(tmp, out_dir)
    except BaseException:
        if not out_dir.exists():
            old.rename(out_dir)  # restore the previous export
        raise
    shutil.rmtree(old, ignore_errors=True)


def _rename(src: Path, dst: Path) -> None:
    try:
        src.rename(dst)
    except OSError as exc:
        raise SfedgeError(f"cannot move the export into {dst}: {exc.strerror or exc} (the previous folder, if any, is kept)") from None


def _remove_empty(folders: list) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break


class Progress:
    """One line per stage on stderr: ``[export] vision_encoder: lower ... 12.3 s, peak 3.41 GiB``; every stage's
    seconds and peak RSS are kept as ``StageRecord`` s for the manifest. Use as a context manager: the RSS
    sampler thread runs inside the block."""

    def __init__(self, prefix: str = "export", stream=None, enabled: bool = True):
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.timings: dict[str, float] = {}
        self.records: List[StageRecord] = []
        self._sampler = RssSampler()
        self._meter = StageMeter(self._sampler)

    def __enter__(self) -> "Progress":
        self._sampler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._sampler.__exit__(*exc)

    @contextlib.contextmanager
    def beside_child(self, pid: int) -> Iterator[None]:
        """Within the block child process ``pid`` exports a part beside this one: stage peaks and ``tree_peak``
        count both processes' RSS (sampled)."""
        self._sampler.child_pids = (pid,)
        try:
            yield
        finally:
            self._sampler.child_pids = ()

    @property
    def tree_peak(self) -> int:
        """The highest sampled RSS of this process and its children (0 when no child ran)."""
        return self._sampler.tree_peak

    def merge(self, records: Sequence[StageRecord], timings: dict) -> None:
        """Put a child process's stages first (their peaks are the child's own; they ran beside this process's)."""
        self.records[:0] = records
        self.timings.update(timings)

    @contextlib.contextmanager
    def stage(self, component: str, stage: str) -> Iterator[None]:
        if self.enabled:
            print(f"[{self.prefix}] {component}: {stage} ...", file=self.stream, flush=True)
        self._meter.begin()
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        peak = self._meter.end()
        self.timings[f"{component}.{stage}"] = round(elapsed, 3)
        self.records.append(StageRecord(component, stage, round(elapsed, 3), peak.peak_bytes))
        if self.enabled:
            print(f"[{self.prefix}] {component}: {stage} done in {elapsed:.1f} s, peak {gib(peak.peak_bytes)}",
                  file=self.stream, flush=True)


def stage_table(records: Sequence[StageRecord], process_peak: int | None = None) -> str:
    """The end-of-export table: stage, component, seconds, peak GiB; the stage that set the process peak is marked."""
    rows = [("stage", "component", "seconds", "peak GiB")]
    peaks = [r.peak_rss_bytes or 0 for r in records]
    top = peaks.index(max(peaks)) if any(peaks) else -1  # the first stage that reached the highest peak
    for index, record in enumerate(records):
        mark = " *" if index == top else ""
        peak = "-" if record.peak_rss_bytes is None else f"{record.peak_rss_bytes / GiB:.2f}{mark}"
        rows.append((record.stage, record.component, f"{record.seconds:.1f}", peak))
    total = sum(r.seconds for r in records)
    rows.append(("total", "", f"{total:.1f}", "-" if process_peak is None else f"{process_peak / GiB:.2f} (process)"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d:>{widths[3]}}".rstrip()
                     for a, b, c, d in rows)


def artifact_entry(folder: Path, component: str, file: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                   quantization: dict, method: str | None = None, **extra) -> ArtifactEntry:
    """A manifest entry for ``folder/file``: its sha256 and size, and (ONNX) the sha256 of each external data file."""
    path = Path(folder) / file
    if extra.get("data_files"):
        extra["data_sha256"] = {name: sha256_file(Path(folder) / name) for name in extra["data_files"]}
    return ArtifactEntry(component=component, file=file, sha256=sha256_path(path), bytes=path_bytes(path),
                         inputs=list(inputs), outputs=list(outputs), quantization=quantization, method=method,
                         extra=dict(extra))


def projector_frame_counts(default_frames: int, extra_frames: Sequence[int]) -> list:
    """The frame counts to export a projector for: the config's first, then the extra ones, no repeats."""
    return list(dict.fromkeys([default_frames, *extra_frames]))


def projector_stem(frames: int, default_frames: int) -> str:
    """``projector`` for the default frame count, ``projector_f32`` for an extra one (32 frames)."""
    return "projector" if frames == default_frames else f"projector_f{frames}"


KV_DTYPE = "kv_dtype"  # the text decoder entry's extra: the dtype of the exported KV cache ("float32", "float16", "int8", ...)


def kv_cache_dtype(model, decoder: ArtifactEntry, folder: Path) -> str:
    """The dtype the exported KV cache holds, read from what the export produced: an exporter's own
    ``kv_dtype``; else (ONNX) the element type of the decoder graph's first past-key input; else the dtype of
    the text decoder's ``k_cache`` buffers after the exporter swapped its attention in place (ExecuTorch
    mutable buffers, Core ML fp16 states)."""
    if decoder.extra.get(KV_DTYPE):
        return str(decoder.extra[KV_DTYPE])
    past = decoder.extra.get("past_inputs")
    if past:
        import onnx

        graph = onnx.load(str(Path(folder) / decoder.file), load_external_data=False).graph
        for value in graph.input:
            if value.name == past[0]:
                return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
        raise SfedgeError(f"{decoder.file} has no input {past[0]!r} although the manifest lists it as a past key")
    for name, buffer in model.text_decoder.named_buffers():
        if name.rsplit(".", 1)[-1] == "k_cache":
            return str(buffer.dtype).removeprefix("torch.")
    raise SfedgeError("the exported text decoder has no k_cache buffer: cannot tell the KV-cache dtype")


def record_kv_dtype(model, entries: Sequence[ArtifactEntry], folder: Path) -> None:
    """Write ``kv_dtype`` into every text decoder entry (one place for every backend; the bench costs the cache with it)."""
    for entry in entries:
        if entry.component == "text_decoder":
            entry.extra[KV_DTYPE] = kv_cache_dtype(model, entry, folder)


# --- building the model one part at a time -----------------------------------------------------------
# export_model() hands a part-by-part exporter a model on the meta device and registers where its weights
# come from; the exporter wraps the work on each part in ``model_part``: the part is filled just before,
# and its memory freed right after, so only one component's float32 weights are alive at a time.
_PART_SOURCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def build_parts_lazily(model, weights) -> None:
    """Let ``model_part`` fill ``model``'s empty parts from ``weights`` (a WeightsSource)."""
    _PART_SOURCES[model] = weights


def weights_source(model):
    """The WeightsSource ``model``'s empty parts are filled from (``build_parts_lazily``), or None (built whole)."""
    return _PART_SOURCES.get(model)


@contextlib.contextmanager
def model_part(model, part: str, progress: "Progress", on_layer=None) -> Iterator[bool]:
    """Within the block ``model``'s part (sfedge.models.PARTS) holds its weights; yields whether this call
    filled it (then ``on_layer`` ran on each decoder layer as it was filled). A part this call filled is
    released on exit (moved to the meta device and collected); a model built whole is left untouched."""
    from sfedge.models import fill_part, part_is_empty, release_part

    weights = _PART_SOURCES.get(model)
    filled = weights is not None and part_is_empty(model, part)
    if filled:
        with progress.stage(part, "build" if on_layer is None else "build + quantize by layer"):
            fill_part(model, weights, part, on_layer=on_layer)
    try:
        yield filled
    finally:
        if filled:
            release_part(model, part)
            gc.collect()
