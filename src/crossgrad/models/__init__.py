"""Model zoo for decentralized training.

>>> from crossgrad.models import make_model, list_models, count_parameters
>>> m = make_model("cnn5", input_shape=(1, 28, 28), num_classes=10, norm="evonorm")

Models (all take ``input_shape=(C, H, W)``, ``num_classes`` and ``norm``):

* ``mlp``         hidden sizes ``hidden=(200, 200)``; ``norm`` ignored.
* ``lenet5``      classic LeNet-5 with automatic padding (works down to 8x8).
* ``cnn5``        NGC paper's 5-layer CNN (needs >= 8x8).
* ``vgg11``       VGG-11 for 32x32 inputs, ``width`` multiplier (needs >= 32x32).
* ``resnet20``    CIFAR ResNet-20, ``shortcut="A"`` (default) or ``"B"``.
* ``mobilenetv2`` CIFAR MobileNetV2, ``width`` multiplier (needs >= 8x8).

Norms: ``"evonorm"`` (EvoNorm-S0, default), ``"group"``, ``"batch"``, ``"none"``; see
:mod:`crossgrad.models.norms` for why batch norm does not mix well with gossip.
All models avoid in-place activation ops and create no parameters in ``forward``, so
they work with ``torch.func.functional_call`` and ``torch.func.vmap``.
"""
from __future__ import annotations

from . import mobilenet, resnet, small, vgg  # noqa: F401  (registers the models)
from .norms import NORM_KINDS, EvoNormS0, default_groups, make_norm, norm_act
from .registry import (
    ModelSpec,
    count_parameters,
    describe_models,
    get_model_spec,
    list_models,
    make_model,
    model_options,
    register_model,
)

__all__ = [
    "NORM_KINDS",
    "EvoNormS0",
    "ModelSpec",
    "count_parameters",
    "default_groups",
    "describe_models",
    "get_model_spec",
    "list_models",
    "make_model",
    "make_norm",
    "model_options",
    "norm_act",
    "register_model",
]
