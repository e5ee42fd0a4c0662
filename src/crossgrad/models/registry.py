"""Model registry: ``register_model`` / ``make_model`` / ``list_models``.

A builder is registered with::

    @register_model("name", default_input_shape=(3, 32, 32))
    def build(input_shape, num_classes, norm, **kw) -> nn.Module: ...

``make_model`` validates the name, the norm, the input shape and the class count,
then calls the builder.  Builders raise ``ValueError`` when the input is too small
for the architecture.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.nn as nn

from .norms import NORM_KINDS, check_norm

__all__ = [
    "ModelSpec",
    "register_model",
    "make_model",
    "list_models",
    "get_model_spec",
    "model_options",
    "count_parameters",
    "describe_models",
    "check_min_size",
]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    default_input_shape: tuple[int, int, int]
    uses_norm: bool
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    default_input_shape: tuple[int, int, int] = (3, 32, 32),
    uses_norm: bool = True,
    description: str = "",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``builder(input_shape, num_classes, norm, **kw)`` as ``name``."""

    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        desc = description or ((builder.__doc__ or "").strip().splitlines() or [""])[0]
        _REGISTRY[name] = ModelSpec(name, builder, tuple(default_input_shape), uses_norm, desc)
        return builder

    return deco


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(list_models())}"
        ) from None


def model_options(name: str) -> list[str]:
    """The keyword options model `name`'s builder takes besides input shape, class count and norm."""
    params = inspect.signature(get_model_spec(name).builder).parameters
    return [p for p in params if p not in ("input_shape", "num_classes", "norm")]


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be three positive ints (C, H, W), got {input_shape!r}")
    return shape  # type: ignore[return-value]


def check_min_size(model: str, input_shape: Sequence[int], min_hw: int, why: str) -> None:
    """Raise a helpful ``ValueError`` if ``H`` or ``W`` is below ``min_hw``."""
    _, h, w = input_shape
    if h < min_hw or w < min_hw:
        # smallest H = W each built-in model accepts (lenet5 with its automatic padding)
        mins = {"mlp": 1, "lenet5": 4, "resnet20": 4, "cnn5": 8, "mobilenetv2": 8, "vgg11": 32}
        fits = [m for m, s in mins.items() if m != model and s <= min(h, w)]
        raise ValueError(
            f"{model} needs inputs of at least {min_hw}x{min_hw} ({why}); got {h}x{w}. "
            f"Models that accept {h}x{w}: {', '.join(fits) or 'none'}"
        )


def make_model(
    name: str,
    input_shape: Sequence[int] | None = None,
    num_classes: int = 10,
    norm: str = "evonorm",
    **kw,
) -> nn.Module:
    """Build model ``name`` for inputs ``[B, *input_shape]`` and ``num_classes`` outputs.

    ``input_shape`` is ``(C, H, W)``; ``None`` means the model's default shape.
    ``norm`` is one of ``"evonorm"``, ``"group"``, ``"batch"``, ``"none"`` (ignored by
    ``mlp``, which has no normalization layers).  Extra keyword arguments go to the
    builder (e.g. ``width=0.5``, ``hidden=(100,)``, ``shortcut="B"``).
    """
    spec = get_model_spec(name)
    check_norm(norm)
    shape = _check_input_shape(spec.default_input_shape if input_shape is None else input_shape)
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    model = spec.builder(shape, int(num_classes), norm, **kw)
    model.model_name = name
    model.input_shape = shape
    model.num_classes = int(num_classes)
    model.norm_kind = norm if spec.uses_norm else "none"
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (buffers such as BN running stats are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe_models(
    input_shape: Sequence[int] | None = None,
    num_classes: int = 10,
    norms: Sequence[str] = ("evonorm",),
) -> str:
    """A plain-text table: model, norm, parameter count (at ``input_shape``, or each
    model's default shape when ``None``), and the input shape used."""
    for n in norms:
        check_norm(n)
    rows = [("model", "norm", "params", "input", "description")]
    for name in list_models():
        spec = _REGISTRY[name]
        shape = tuple(spec.default_input_shape if input_shape is None else input_shape)
        shape_s = "x".join(str(s) for s in shape)
        for norm in norms if spec.uses_norm else ("-",):
            try:
                m = make_model(name, shape, num_classes, norm if norm != "-" else NORM_KINDS[0])
                params = f"{count_parameters(m):,}"
            except ValueError:
                params = "input too small"
            rows.append((name, norm, params, shape_s, spec.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [
            r[i].rjust(widths[i]) if i == 2 and j > 0 else r[i].ljust(widths[i]) for i in range(len(r))
        ]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
