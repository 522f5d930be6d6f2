"""Frozen dataclass configs and named presets.

Every value MODEL.md marks as *assumed* is a field here, never a constant in the model code.
Presets are looked up by exact name; every real-size preset has the ``tiny`` twin used in tests.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Dict, Tuple

from sfedge.errors import SfedgeError, UsageError

SLOW_POOLS = ("concat", "spatial_1d_max_pool", "spatial_1d_avg_pool", "spatial_2d_max_pool", "spatial_2d_avg_pool")


@dataclass(frozen=True)
class VisionConfig:
    """Oryx-ViT (SigLIP-so400m layout): no CLS token, no final norm, no pooling head."""

    patch_size: int = 16
    width: int = 1152
    depth: int = 27
    heads: int = 16
    mlp_dim: int = 4304
    pos_grid: int = 128  # learned position grid, bilinearly resized to the frame's patch grid
    frame_size: int = 384  # square video frames; assumed 384 for SF-LLaVA-1.5
    layer_norm_eps: float = 1e-6
    pixel_mean: float = 0.5
    pixel_std: float = 0.5

    @property
    def grid(self) -> int:
        return self.frame_size // self.patch_size

    @property
    def patches_per_frame(self) -> int:
        return self.grid * self.grid

    def validate(self) -> None:
        _check_positive("vision", self, ("patch_size", "width", "depth", "heads", "mlp_dim", "pos_grid", "frame_size"))
        if self.frame_size % self.patch_size:
            raise UsageError(f"frame size {self.frame_size} is not a multiple of patch size {self.patch_size}")
        if self.width % self.heads:
            raise UsageError(f"vision width {self.width} is not divisible by {self.heads} heads")


@dataclass(frozen=True)
class SlowFastConfig:
    """SlowFast projector: mlp2x_gelu plus the slow (few frames, light pooling) and fast pathways."""

    frames: int = 128  # T: frames sampled per video (max frames)
    slow_frames: int = 32
    slow_pool: str = "spatial_2d_avg_pool"  # one of SLOW_POOLS
    slow_kernel: int = 2  # pooling kernel and stride of the slow pathway
    fast_grid: Tuple[int, int] = (6, 6)  # adaptive average pool output of the fast pathway
    mlp_before_pool: bool = True  # v1 code and LLaVA-Video apply the MLP first (assumed for 1.5)
    # T < N: True keeps N slow frames with repeated indices (v1's prepare_slowfast); False keeps the
    # min(N, T) distinct frames (fewer tokens, not v1; sfedge's rule before v1-exact, `--no-slow-repeat`)
    slow_repeat: bool = True

    @property
    def spec(self) -> str:
        """The SF-LLaVA spec string (kernel 2 is implied by the v1 names; others get a suffix)."""
        pool = self.slow_pool if self.slow_kernel == 2 or self.slow_pool == "concat" else f"{self.slow_pool}{self.slow_kernel}"
        return f"slowfast-slow_{self.slow_frames}frms_{pool}-fast_{self.fast_grid[0]}x{self.fast_grid[1]}"

    def effective_slow_frames(self, frames: int) -> int:
        """N, as in the v1 code (with fewer sampled frames than N, slow frames repeat); min(N, T)
        without ``slow_repeat``."""
        return self.slow_frames if self.slow_repeat else min(self.slow_frames, frames)

    def slow_indices(self, frames: int) -> list[int]:
        """v1 code (``prepare_slowfast``), bit for bit: ``torch.linspace(0, T, N + 1).to(torch.int32)[:-1]``.

        N indices for any T: when T < N indices repeat (T=7, N=10: [0,0,1,2,2,3,4,4,5,6]); without
        ``slow_repeat``, min(N, T) indices (all T frames once)."""
        import torch  # float32 linspace rounding is part of the v1 semantics

        n = self.effective_slow_frames(frames)
        return torch.linspace(0, frames, n + 1).to(torch.int32).tolist()[:-1]

    def slow_tokens_per_frame(self, grid: int) -> int:
        patches = grid * grid
        k = self.slow_kernel
        if self.slow_pool == "concat":
            return patches
        if self.slow_pool.startswith("spatial_1d"):
            return (patches - k) // k + 1
        return ((grid - k) // k + 1) ** 2

    def fast_tokens_per_frame(self) -> int:
        return self.fast_grid[0] * self.fast_grid[1]

    def validate(self, grid: int) -> None:
        if self.slow_pool not in SLOW_POOLS:
            raise UsageError(f"unknown slow pooling {self.slow_pool!r}; known: {', '.join(SLOW_POOLS)}")
        _check_positive("slowfast", self, ("frames", "slow_frames", "slow_kernel"))
        if len(self.fast_grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) for g in self.fast_grid):
            raise UsageError(f"slowfast.fast_grid = {self.fast_grid!r}; expected two positive integers")
        if self.frames < 1 or self.slow_frames < 1:
            raise UsageError(f"frames ({self.frames}) and slow frames ({self.slow_frames}) must be >= 1")
        if self.slow_kernel < 1 or (self.slow_pool.startswith("spatial_2d") and self.slow_kernel > grid):
            raise UsageError(f"slow pooling kernel {self.slow_kernel} does not fit a {grid}x{grid} patch grid")
        if self.fast_grid[0] > grid or self.fast_grid[1] > grid or min(self.fast_grid) < 1:
            raise UsageError(f"fast grid {self.fast_grid[0]}x{self.fast_grid[1]} does not fit a {grid}x{grid} patch grid")


def _check_positive(section: str, config, names: Tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{section}.{name} = {value!r}; expected a positive integer")


_SPEC_RE = re.compile(r"^slowfast-slow_(\d+)frms_(\w+?)(\d*)-fast_(\d+)x(\d+)$")


def parse_slowfast_spec(spec: str, frames: int, mlp_before_pool: bool = True, slow_repeat: bool = True) -> SlowFastConfig:
    """Parse an SF-LLaVA spec such as ``slowfast-slow_10frms_spatial_1d_max_pool-fast_4x4``.

    Grammar: ``slowfast-slow_{N}frms_{POOL}[{K}]-fast_{A}x{B}`` with POOL one of SLOW_POOLS;
    K (pooling kernel = stride) defaults to 2 as in the v1 code.
    """
    match = _SPEC_RE.match(spec.strip())
    if not match or match.group(2) not in SLOW_POOLS:
        raise UsageError(
            f"malformed SlowFast spec {spec!r}; expected slowfast-slow_{{N}}frms_{{POOL}}-fast_{{A}}x{{B}} "
            f"with POOL one of {', '.join(SLOW_POOLS)}, e.g. slowfast-slow_10frms_spatial_1d_max_pool-fast_4x4"
        )
    n_slow, pool, kernel, fa, fb = match.groups()
    return SlowFastConfig(
        frames=frames,
        slow_frames=int(n_slow),
        slow_pool=pool,
        slow_kernel=int(kernel) if kernel else 2,
        fast_grid=(int(fa), int(fb)),
        mlp_before_pool=mlp_before_pool,
        slow_repeat=slow_repeat,
    )


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2.5 decoder: RMSNorm, SiLU-gated MLP, RoPE, GQA, bias on q/k/v only."""

    hidden: int = 1536
    layers: int = 28
    heads: int = 12
    kv_heads: int = 2
    head_dim: int = 128
    intermediate: int = 8960
    vocab_size: int = 151936
    tie_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_context: int = 32768
    bos_id: int = 151643  # <|endoftext|>: Qwen adds no BOS; runners that ask get this id
    eos_ids: Tuple[int, ...] = (151645, 151643)  # <|im_end|>, <|endoftext|>
    special_tokens: Tuple[Tuple[str, int], ...] = (
        ("<|endoftext|>", 151643),
        ("<|im_start|>", 151644),
        ("<|im_end|>", 151645),
    )

    def kv_bytes_per_token(self, bytes_per_value: float) -> int:
        return int(2 * self.layers * self.kv_heads * self.head_dim * bytes_per_value)

    def validate(self) -> None:
        _check_positive("llm", self, ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab_size",
                                      "max_context"))
        if self.heads % self.kv_heads:
            raise UsageError(f"LLM heads ({self.heads}) must be a multiple of kv heads ({self.kv_heads})")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vision: VisionConfig
    slowfast: SlowFastConfig
    llm: LLMConfig
    tokenizer: str = "qwen2.5"  # "qwen2.5" (real Qwen BPE) or "tiny" (a small BPE trained in-process)
    prompt_template: str = "qwen-chatml"

    def validate(self) -> "ModelConfig":
        self.vision.validate()
        self.slowfast.validate(self.vision.grid)
        self.llm.validate()
        return self

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()

    def with_slowfast(self, frames: int | None = None, spec: str | None = None,
                      slow_repeat: bool | None = None) -> "ModelConfig":
        """Apply ``--frames``, ``--slowfast`` and ``--no-slow-repeat`` on top of the preset."""
        slowfast = self.slowfast
        if spec:
            slowfast = parse_slowfast_spec(spec, frames or slowfast.frames, slowfast.mlp_before_pool, slowfast.slow_repeat)
        elif frames:
            slowfast = dataclasses.replace(slowfast, frames=frames)
        if slow_repeat is not None:
            slowfast = dataclasses.replace(slowfast, slow_repeat=slow_repeat)
        return self.replace(slowfast=slowfast)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict, source: str = "the manifest's model_config") -> "ModelConfig":
        """A config written by ``to_dict``; anything else is an SfedgeError naming ``source``."""
        try:
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__}, expected an object")
            llm = dict(data["llm"])
            llm["eos_ids"] = tuple(llm["eos_ids"])
            llm["special_tokens"] = tuple(tuple(pair) for pair in llm["special_tokens"])
            slowfast = dict(data["slowfast"])
            slowfast["fast_grid"] = tuple(slowfast["fast_grid"])
            slowfast.setdefault("slow_repeat", False)  # folders exported before the field kept min(N, T) slow frames
            config = ModelConfig(
                name=str(data["name"]),
                vision=VisionConfig(**data["vision"]),
                slowfast=SlowFastConfig(**slowfast),
                llm=LLMConfig(**llm),
                tokenizer=data.get("tokenizer", "qwen2.5"),
                prompt_template=data.get("prompt_template", "qwen-chatml"),
            )
        except KeyError as exc:
            raise SfedgeError(f"{source} lacks the field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise SfedgeError(f"{source} is malformed ({exc})") from None
        try:
            return config.validate()
        except UsageError as exc:
            raise SfedgeError(f"{source}: {exc}") from None


# --- presets: the true shapes of MODEL.md, plus the tiny twin ---------------------------------

QWEN25_1_5B = LLMConfig()
QWEN25_3B = dataclasses.replace(QWEN25_1_5B, hidden=2048, layers=36, heads=16, intermediate=11008)
QWEN25_7B = dataclasses.replace(
    QWEN25_1_5B, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab_size=152064, tie_embeddings=False
)
ORYX_VIT = VisionConfig()
SF_LLAVA_15_SLOWFAST = SlowFastConfig()

TINY_LLM = LLMConfig(
    hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab_size=512, max_context=1024,
    bos_id=0, eos_ids=(2, 0), special_tokens=(("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)),
)
TINY_VISION = VisionConfig(patch_size=16, width=64, depth=2, heads=4, mlp_dim=160, pos_grid=8, frame_size=64)
TINY_SLOWFAST = SlowFastConfig(frames=8, slow_frames=2, slow_pool="spatial_2d_avg_pool", slow_kernel=2, fast_grid=(2, 2))

PRESETS: Dict[str, ModelConfig] = {
    "sf-llava-1.5-1b": ModelConfig("sf-llava-1.5-1b", ORYX_VIT, SF_LLAVA_15_SLOWFAST, QWEN25_1_5B),
    "sf-llava-1.5-3b": ModelConfig("sf-llava-1.5-3b", ORYX_VIT, SF_LLAVA_15_SLOWFAST, QWEN25_3B),
    "sf-llava-1.5-7b": ModelConfig("sf-llava-1.5-7b", ORYX_VIT, SF_LLAVA_15_SLOWFAST, QWEN25_7B),
    "tiny": ModelConfig("tiny", TINY_VISION, TINY_SLOWFAST, TINY_LLM, tokenizer="tiny"),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name].validate()
    except KeyError:
        raise UsageError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
