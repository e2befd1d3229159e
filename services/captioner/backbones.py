"""Captioner backbones: built for training, rebuilt from a checkpoint's description.

Two families are buildable:

- the torchvision ResNet family (`resnet18` … `resnet152`, `wide_resnet50_2`, …),
  weights from a local state-dict file, read at the reference MILAN stages
  (conv1's activation, layer1..layer4);
- the toy world's `toynet`, whose architecture class is `ToyNet` in
  `services.toyworld.toynet` (imported only when a toynet is built), read
  at every top-level child module that outputs a feature map.

Both use ImageNet normalisation (the toy models were trained with it too).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from services.captioner.captioner import Captioner
from services.captioner.checkpoint import (
    CheckpointFile,
    backbone_description,
    captioner_from_checkpoint,
    read_checkpoint,
)
from services.captioner.encoder import (
    RESNET_STAGES,
    BackboneDescription,
    MaskedPoolingEncoder,
    torchvision_backbone,
)
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound

TOYNET = "toynet"
TOY_ARCHITECTURES = "services.toyworld.toynet"
# Side of the blank image run once through a custom backbone to find its map stages.
_PROBE_SIZE = 64


def resnet_architectures() -> tuple[str, ...]:
    """The torchvision ResNet-family classification models, by name."""
    return tuple(
        name
        for name in torchvision.models.list_models(module=torchvision.models)
        if "resnet" in name or "resnext" in name
    )


def backbone_choices() -> tuple[str, ...]:
    """Every architecture `build_encoder` accepts."""
    return (*resnet_architectures(), TOYNET)


def toynet() -> nn.Module:
    """An untrained toynet, from the toy world's architecture (FailedPrecondition if absent)."""
    try:
        module = importlib.import_module(TOY_ARCHITECTURES)
    except ImportError as exc:
        raise FailedPrecondition(
            f"the toynet architecture is not installed ({TOY_ARCHITECTURES}: {exc})",
            field="backbone.architecture",
        ) from exc
    model: nn.Module = module.ToyNet()
    return model


def map_stages(backbone: nn.Module) -> tuple[str, ...]:
    """Names of the backbone's top-level children that output (B, C, h, w) maps, in call order."""
    found: list[str] = []

    def keeper(name: str) -> Any:
        def keep(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor) and output.dim() == 4 and name not in found:
                found.append(name)

        return keep

    handles = [child.register_forward_hook(keeper(n)) for n, child in backbone.named_children()]
    try:
        with torch.no_grad():
            backbone.eval()(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE))
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        raise InvalidArgument("has no top-level module that outputs a feature map", "backbone")
    return tuple(found)


def custom_backbone(description: BackboneDescription) -> nn.Module:
    """An untrained instance of a custom backbone named by a checkpoint's description."""
    if description.architecture == TOYNET:
        return toynet()
    raise FailedPrecondition(
        f"the checkpoint's backbone is a custom {description.architecture!r}; "
        f"buildable backbones are the torchvision ResNet family and {TOYNET!r}",
        field="backbone.architecture",
    )


def build_encoder(architecture: str, weights_path: Path | None = None) -> MaskedPoolingEncoder:
    """A frozen encoder over `architecture` (see `backbone_choices`), weights from a local file.

    Without `weights_path` the backbone keeps random weights (tests only: a captioner
    is only as good as its backbone's features).
    """
    if architecture == TOYNET:
        backbone = toynet()
        if weights_path is not None:
            if not weights_path.is_file():
                raise NotFound(f"no weight file at {weights_path}", field="backbone.weights_path")
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            backbone.load_state_dict(state)
        return MaskedPoolingEncoder(
            backbone, BackboneDescription("custom", TOYNET, map_stages(backbone))
        )
    if architecture not in resnet_architectures():
        allowed = ", ".join(backbone_choices())
        raise InvalidArgument(f"{architecture!r} is not one of {allowed}", "backbone.architecture")
    backbone = torchvision_backbone(architecture, weights_path)
    return MaskedPoolingEncoder(
        backbone, BackboneDescription("torchvision", architecture, RESNET_STAGES)
    )


def load_captioner(file: CheckpointFile, map_location: str | torch.device = "cpu") -> Captioner:
    """Load a checkpoint whose backbone is rebuilt from its own description.

    Raises `InvalidArgument` for a file that is not a captioner checkpoint and
    `FailedPrecondition` when its backbone cannot be built here (an unknown custom
    architecture, or weights that do not fit the architecture installed).
    """
    data = read_checkpoint(file, map_location)
    description = backbone_description(data)
    backbone = None if description.source == "torchvision" else custom_backbone(description)
    try:
        return captioner_from_checkpoint(data, backbone, map_location)
    # get_model: an architecture this torchvision lacks; load_state_dict: weights that
    # are missing, unexpected or mis-shaped.
    except (ValueError, RuntimeError) as exc:
        raise FailedPrecondition(
            f"the checkpoint's weights do not fit the {description.architecture!r} built here: "
            f"{exc}",
            field="backbone",
        ) from exc
