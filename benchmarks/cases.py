"""Benchmark cases: what one worker process measures, the sweep that expands into them, and
their compact names (llama-bench style: ``f32+pp256+tg64``)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from sfedge.errors import UsageError


@dataclass(frozen=True)
class Source:
    """What to run: an eager preset (random weights of its true shapes) or an artifact folder."""

    preset: Optional[str] = None
    folder: Optional[str] = None
    backend: Optional[str] = None  # with a folder: override its manifest's backend (e.g. eager)

    @property
    def label(self) -> str:
        if self.preset:
            return f"{self.preset}@eager"
        name = Path(self.folder).name
        return f"{name}@{self.backend}" if self.backend else name

    @property
    def fixed_frames(self) -> bool:
        return self.folder is not None


@dataclass(frozen=True)
class BenchCase:
    """One row of results: measured in one fresh worker process."""

    source: Source
    video: str
    frames: Optional[int] = None  # None: the preset's / the export's frame count
    slowfast: Optional[str] = None  # eager presets only
    prompt_tokens: Optional[int] = None  # text tokens of the prompt (template + question); None: the default question
    gen_tokens: int = 32
    threads: Optional[int] = None
    repetitions: int = 5
    warmup: int = 1
    seed: int = 0
    inject_delay_ms: float = 0.0  # test hook: sleep this long in every decode step (see docs/benchmarks.md)
    verify: bool = True
    questions: int = 1  # video chat: questions per opened video (benchmarks/chat_case.py)
    realtime: bool = False  # video chat: replay the clip at its frame rate, ask after the last frame

    @property
    def name(self) -> str:
        """Compact name of the swept parameters (the source is a separate column)."""
        parts = [f"f{self.frames}" if self.frames else "f*"]
        if self.slowfast:
            parts.append("sf" + short_spec(self.slowfast))
        if self.prompt_tokens is not None:
            parts.append(f"pp{self.prompt_tokens}")
        parts.append(f"tg{self.gen_tokens}")
        if self.threads:
            parts.append(f"t{self.threads}")
        if self.questions > 1:
            parts.append(f"q{self.questions}")
        if self.realtime:
            parts.append("rt")
        return "+".join(parts)

    @property
    def key(self) -> str:
        """Identity used to match a case against a baseline."""
        return f"{self.source.label} {self.name}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict) -> "BenchCase":
        return BenchCase(**{**data, "source": Source(**data["source"])})

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def short_spec(spec: str) -> str:
    """slowfast-slow_10frms_spatial_1d_max_pool-fast_4x4 -> 10-1d_max-4x4"""
    out = spec.replace("slowfast-slow_", "").replace("frms_", "-").replace("spatial_", "")
    return out.replace("_pool", "").replace("-fast_", "-")


@dataclass
class Sweep:
    """The user's lists; ``expand`` turns them into cases (ordered so each source's model is built
    in consecutive cases) plus notes about values that do not apply."""

    sources: List[Source]
    video: str
    frames: Sequence[Optional[int]] = (None,)
    slowfast: Sequence[Optional[str]] = (None,)
    prompt_tokens: Sequence[Optional[int]] = (None,)
    gen_tokens: Sequence[int] = (32,)
    threads: Sequence[Optional[int]] = (None,)
    repetitions: int = 5
    warmup: int = 1
    seed: int = 0
    inject_delay_ms: float = 0.0
    verify: bool = True
    questions: int = 1
    realtime: bool = False
    notes: List[str] = field(default_factory=list)

    def expand(self) -> List[BenchCase]:
        cases: List[BenchCase] = []
        self.notes = []
        for source in self.sources:
            frames, slowfast = list(self.frames), list(self.slowfast)
            if source.fixed_frames:
                exported = folder_frames(source.folder)
                requested = [f for f in frames if f is not None]
                skipped = [str(f) for f in requested if f not in exported]
                if skipped:
                    self.notes.append(f"{source.label}: the export has projectors for {','.join(map(str, exported))} frames; "
                                      f"skipped --frames {','.join(skipped)} (re-export with `--frames` listing them)")
                frames = [f for f in requested if f in exported] if requested else [exported[0]]
                if any(slowfast):
                    self.notes.append(f"{source.label}: the SlowFast spec is fixed by the export; skipped --slowfast "
                                      f"{','.join(s for s in slowfast if s)}")
                slowfast = [None]
            else:
                from sfedge.config import get_preset

                default = get_preset(source.preset).slowfast.frames
                frames = list(dict.fromkeys(f or default for f in frames))
            for threads in self.threads:
                for spec in slowfast:
                    for frame_count in frames:
                        for prompt in self.prompt_tokens:
                            for gen in self.gen_tokens:
                                cases.append(BenchCase(
                                    source=source, video=self.video, frames=frame_count, slowfast=spec,
                                    prompt_tokens=prompt, gen_tokens=gen, threads=threads,
                                    repetitions=self.repetitions, warmup=self.warmup, seed=self.seed,
                                    inject_delay_ms=self.inject_delay_ms, verify=self.verify,
                                    questions=self.questions, realtime=self.realtime))
        return cases


def folder_frames(folder: str) -> List[int]:
    """The static frame counts an artifact folder has projectors for, the default first (from its manifest)."""
    from sfedge.manifest import read_manifest

    return list(read_manifest(folder).projectors())


# --- list parsing for the CLI (-p 128,512 style) --------------------------------------------------

def parse_int_list(text: Optional[str], flag: str, minimum: int = 1) -> list:
    if text is None:
        return [None]
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise UsageError(f"{flag} takes comma-separated integers, e.g. {flag} 8,32; got {text!r}") from None
        if value < minimum:
            raise UsageError(f"{flag} values must be >= {minimum}, got {value}")
        values.append(value)
    return list(dict.fromkeys(values))


def parse_str_list(text: Optional[str]) -> list:
    if text is None:
        return [None]
    return list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip())) or [None]
