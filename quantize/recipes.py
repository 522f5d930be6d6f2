"""Quantization recipes as data: per backend, a recipe names a scheme per component.

A recipe's parity tolerance is part of it: ``sfedge parity`` checks each artifact against the eager
fp32 model with the tolerance of the recipe it was exported with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from sfedge.errors import UsageError
from sfedge.manifest import Component
from sfedge.registry import Registry


@dataclass(frozen=True)
class Tolerance:
    """What ``sfedge parity`` accepts for a recipe (runtime/parity.py applies it).

    Against the eager fp32 model: ``max_abs`` and ``min_cosine`` per component output and on the
    decoder logits, ``max_kl`` on the mean KL(fp32 || artifact) over the teacher-forced steps.
    ``min_top1`` is the top-1 agreement with the gate's reference: the simulated recipe when the
    backend registers a simulator (then ``simulated``, default ``EXACT_EXPORT``, applies instead of
    ``min_top1``), else eager fp32. Steps where the reference's top-1 logit leads the runner-up by no
    more than ``near_tie`` are near ties: reported, not counted (rounding may legitimately flip them).
    """

    max_abs: Optional[float] = None  # checked per component when set
    min_top1: Optional[float] = None  # checked end to end when set
    min_cosine: Optional[float] = None  # checked per component when set
    max_kl: Optional[float] = None  # mean KL(fp32 || artifact) over the teacher-forced steps, nats
    near_tie: float = 0.0  # top-1 margin (logits) at or under which a step is not counted
    simulated: Optional["Tolerance"] = None  # against the simulated recipe (None: EXACT_EXPORT)

    def describe(self) -> str:
        parts = []
        if self.max_abs is not None:
            parts.append(f"max abs <= {self.max_abs:g}")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        if self.max_kl is not None:
            parts.append(f"KL vs fp32 <= {self.max_kl:g}")
        if self.min_top1 is not None:
            parts.append(f"top-1 agreement >= {self.min_top1:.0%}" + (f" (margin > {self.near_tie:g})" if self.near_tie else ""))
        return ", ".join(parts)


# Measured on the tiny preset (`sfedge export --model tiny --max-context 128 --prefill-chunk 32 --seed W`,
# then run_parity(folder, steps=32, seed=S) for S = 0..5: 33 teacher-forced steps; the script is in the
# trust-gates report). KL is the mean over the steps of KL(P || Q) in nats, P the reference.
#
# recipe            weights W  vs fp32: KL mean (max over S)  top-1 (min)  logits cosine (min)   vs simulated: KL (max)  max abs
# onnx fp16         0          1.0e-6                          100 %        1.0000                1.4e-6                  0.009
# onnx int8         0          1.5e-3                          100 %        0.9992                9.6e-4                  0.39
# onnx int4         0          0.154                           72.7 %       0.958                 6.7e-5                  0.11
# onnx q4f16        0          MEASURED_Q4F16
# executorch 8da8w  0          MEASURED_8DA8W
# executorch 8da4w  0          MEASURED_8DA4W
# The bounds below keep a margin of 3x or more over these maxima.

# What an exact export achieves against its simulated recipe (runtime/parity.py): every decisive step's
# top-1 agrees, and the logits stay within rounding of the simulated model's (the simulators model the
# kernels, e.g. ONNX q4f16's fp16 compute, not bit for bit: hence a KL bound, not zero).
EXACT_EXPORT = Tolerance(min_top1=1.0, max_kl=2e-3, near_tie=0.5)
FP32_TOLERANCE = Tolerance(max_abs=1e-4, min_top1=1.0)
# ONNX int8's dynamic activation rounding is modelled per linear only (ORT also quantizes other MatMuls):
# a looser exactness bound against its simulation
INT8_TOLERANCE = Tolerance(min_top1=0.99, min_cosine=0.99, max_kl=1e-2,
                           simulated=Tolerance(min_top1=1.0, max_kl=5e-3, near_tie=1.0))
INT4_TOLERANCE = Tolerance(min_top1=0.90, min_cosine=0.90, max_kl=0.5, near_tie=0.5)
FP16_TOLERANCE = Tolerance(min_top1=0.99, min_cosine=0.999, max_kl=1e-4)


@dataclass(frozen=True)
class ComponentScheme:
    """How one component is quantized: ``scheme`` is the backend's vocabulary (e.g. 8da4w)."""

    scheme: str = "fp32"
    group_size: Optional[int] = None
    options: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group_size, **({"options": dict(self.options)} if self.options else {})}


@dataclass(frozen=True)
class Recipe:
    name: str
    backend: str
    description: str
    components: Dict[str, ComponentScheme]
    tolerance: Tolerance

    def scheme(self, component: Component | str) -> ComponentScheme:
        key = component.value if isinstance(component, Component) else component
        return self.components.get(key, ComponentScheme())


RECIPES: Dict[str, Registry[Recipe]] = {}

# backend -> fn(model, recipe) that quantizes an eager SFLlava in place as the backend's exporter does
# (the "simulated quantization" reference of parity; backends without one are compared with fp32 only)
SIMULATORS: Dict[str, Callable] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    RECIPES.setdefault(recipe.backend, Registry(f"{recipe.backend} quantization recipe")).add(recipe.name, recipe)
    return recipe


RECIPE_MODULES = {"executorch": "sfedge.quantize.executorch", "onnx": "sfedge.quantize.onnx",
                  "coreml": "sfedge.quantize.coreml", "executorch-coreml": "sfedge.quantize.coreml"}


def _load_backend_recipes(backend: str) -> None:
    """Each backend's recipes live in quantize/<backend>.py (pure data: no heavy imports at top)."""
    import importlib

    if backend in RECIPE_MODULES and backend not in RECIPES:
        try:
            importlib.import_module(RECIPE_MODULES[backend])
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("sfedge"):
                raise


def get_recipe(backend: str, name: str) -> Recipe:
    _load_backend_recipes(backend)
    if backend not in RECIPES:
        raise UsageError(f"backend {backend!r} has no quantization recipes; backends with recipes: {', '.join(RECIPES)}")
    return RECIPES[backend].get(name)


def simulator(backend: str) -> Optional[Callable]:
    _load_backend_recipes(backend)
    return SIMULATORS.get(backend)


def recipe_names(backend: str) -> list[str]:
    _load_backend_recipes(backend)
    return RECIPES[backend].names() if backend in RECIPES else []


def uniform(scheme: ComponentScheme, **overrides: ComponentScheme) -> Dict[str, ComponentScheme]:
    """The same scheme for all four components, with per-component overrides."""
    table = {c.value: scheme for c in Component}
    table.update(overrides)
    return table


def per_part(vision: ComponentScheme, decoder: ComponentScheme, embedding: ComponentScheme) -> Dict[str, ComponentScheme]:
    """Vision encoder + projector share one scheme; token embedding and text decoder get their own."""
    return {Component.VISION_ENCODER.value: vision, Component.PROJECTOR.value: vision,
            Component.TOKEN_EMBEDDING.value: embedding, Component.TEXT_DECODER.value: decoder}


register_recipe(Recipe("fp32", "eager", "the eager PyTorch model in fp32 (the parity reference)",
                       uniform(ComponentScheme("fp32")), FP32_TOLERANCE))
