"""Per-run timings. Field names follow ExecuTorch's PyTorchObserver where they overlap (all
``*_ms`` timestamps are relative to ``inference_start_ms`` = 0); video stages are added."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass


def now_ms() -> float:
    return time.perf_counter_ns() / 1e6


def peak_rss_bytes() -> int:
    """This process's own peak resident set size (not system-wide memory).

    On Linux ``ru_maxrss`` survives fork + exec: a fresh bench worker would report its parent's peak
    when that was larger. ``VmHWM`` in /proc/self/status belongs to this process image alone."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class RunStats:
    # PyTorchObserver fields
    model_load_start_ms: float = 0.0
    model_load_end_ms: float = 0.0
    inference_start_ms: float = 0.0
    token_encode_end_ms: float = 0.0
    prompt_eval_end_ms: float = 0.0
    first_token_ms: float = 0.0
    inference_end_ms: float = 0.0
    aggregate_sampling_time_ms: float = 0.0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    # video stages (durations)
    video_decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    vision_encode_ms: float = 0.0
    projector_ms: float = 0.0
    embed_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    frames: int = 0
    visual_tokens: int = 0
    peak_rss_bytes: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.num_prompt_tokens / (self.prefill_ms / 1e3) if self.prefill_ms else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first generated token comes from prefill; the rest from decode steps
        steps = max(self.num_generated_tokens - 1, 0)
        return steps / (self.decode_ms / 1e3) if self.decode_ms and steps else 0.0

    @property
    def ttft_ms(self) -> float:
        return self.first_token_ms - self.inference_start_ms

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(prefill_tokens_per_s=self.prefill_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s,
                    ttft_ms=self.ttft_ms)
        return data

    def summary(self) -> str:
        return (f"frames {self.frames} | visual tokens {self.visual_tokens} | video decode {self.video_decode_ms:.0f} ms | "
                f"preprocess {self.preprocess_ms:.0f} ms | encode {self.vision_encode_ms:.0f} ms | "
                f"project {self.projector_ms:.0f} ms | prefill {self.num_prompt_tokens} tok {self.prefill_ms:.0f} ms "
                f"({self.prefill_tokens_per_s:.0f} tok/s) | TTFT {self.ttft_ms:.0f} ms | decode "
                f"{self.num_generated_tokens} tok {self.decode_tokens_per_s:.1f} tok/s | peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB")
