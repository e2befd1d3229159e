"""Exemplar encoder: masked multi-stage pooling over a frozen CNN backbone.

The backbone sees the unmasked exemplar image. At each named stage the exemplar's
mask is resized to the stage's feature map, normalised to sum 1 and used as the
weights of a weighted spatial average; the per-stage vectors are concatenated into
one vector of `feature_dim` = Σ stage channels per exemplar, so a unit's k exemplars
become a (k, D) matrix for the decoder to attend over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from services.common.errors import InvalidArgument, NotFound

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The reference stages of a torchvision ResNet: "relu" is the top-level module that
# follows conv1 and bn1 (each residual block has its own relu), so it yields conv1's
# activated output.
RESNET_STAGES = ("relu", "layer1", "layer2", "layer3", "layer4")
# MILANNOTATIONS exemplar images are 224×224.
DEFAULT_INPUT_SIZE = 224
# Side of the blank image passed once at construction to learn each stage's width.
_PROBE_SIZE = 64


@dataclass(frozen=True)
class BackboneDescription:
    """How to rebuild a backbone and read it: enough to make a checkpoint self-describing.

    `source` is "torchvision" (rebuilt by `architecture` name) or "custom" (the caller
    supplies the module when loading). `mean`/`std` normalise [0, 1] RGB inputs.
    `input_size` is the side of the square exemplar images the captioner was trained
    on; exemplars are resized to it before captioning.
    """

    source: str
    architecture: str
    stages: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = DEFAULT_INPUT_SIZE

    def __post_init__(self) -> None:
        if self.source not in ("torchvision", "custom"):
            raise InvalidArgument(
                f"is {self.source!r}; allowed: 'torchvision', 'custom'", field="backbone.source"
            )
        if not self.stages:
            raise InvalidArgument("needs at least one stage name", field="backbone.stages")
        if self.input_size < 1:
            raise InvalidArgument(
                f"is {self.input_size}; must be at least 1", field="backbone.input_size"
            )

    def to_json(self) -> dict[str, Any]:
        """Plain dict (strings, lists, floats) for checkpoints and reports."""
        return {
            "source": self.source,
            "architecture": self.architecture,
            "stages": list(self.stages),
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": self.input_size,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackboneDescription:
        """Inverse of `to_json`."""
        mean, std = data["mean"], data["std"]
        return cls(
            source=data["source"],
            architecture=data["architecture"],
            stages=tuple(data["stages"]),
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            input_size=int(data.get("input_size", DEFAULT_INPUT_SIZE)),
        )


def torchvision_backbone(architecture: str, weights_path: Path | None = None) -> nn.Module:
    """A torchvision classification model, weights from a local state-dict file or random.

    Nothing is downloaded: without `weights_path` the model keeps its random
    initialisation (tests, benchmarks).
    """
    if architecture not in torchvision.models.list_models(module=torchvision.models):
        raise InvalidArgument(
            f"{architecture!r} is not a torchvision classification model "
            "(e.g. resnet18, resnet50, resnet101)",
            field="backbone.architecture",
        )
    model = torchvision.models.get_model(architecture, weights=None)
    if weights_path is not None:
        if not weights_path.is_file():
            raise NotFound(f"no weight file at {weights_path}", field="backbone.weights_path")
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model


def masked_average(features: Tensor, masks: Tensor) -> Tensor:
    """Mask-weighted spatial average of feature maps.

    features: (B, C, h, w) float; masks: (B, 1, H, W), any resolution, values in [0, 1].
    The mask is resized to (h, w) bilinearly (antialiased, so a small mask does not
    vanish at a coarse stage), normalised to sum 1 and used as averaging weights.
    Returns (B, C); rows whose resized mask is empty are zeros, never NaN.
    An all-ones mask gives the plain global average.
    """
    weights = F.interpolate(
        masks.to(features.dtype),
        size=features.shape[-2:],
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    total = weights.sum(dim=(2, 3), keepdim=True)
    weights = weights / total.clamp_min(torch.finfo(weights.dtype).tiny)
    return (features * weights).sum(dim=(2, 3))


class MaskedPoolingEncoder(nn.Module):
    """Frozen backbone + masked pooling at named stages → one (D,) vector per exemplar."""

    mean: Tensor
    std: Tensor

    def __init__(self, backbone: nn.Module, description: BackboneDescription) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.description = description
        self.register_buffer("mean", torch.tensor(description.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(description.std).view(1, 3, 1, 1))
        self._maps: dict[str, Tensor] = {}
        for name in description.stages:
            try:
                stage = backbone.get_submodule(name)
            except AttributeError as exc:
                raise InvalidArgument(
                    f"{name!r} is not a module of the backbone", field="backbone.stages"
                ) from exc
            stage.register_forward_hook(self._keeper(name))
        tensors = [*backbone.parameters(), *backbone.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
        probe = self._stage_maps(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE, device=device))
        self.stage_dims = tuple(probe[name].shape[1] for name in description.stages)
        self.feature_dim = sum(self.stage_dims)

    @classmethod
    def from_torchvision(
        cls,
        architecture: str,
        weights_path: Path | None = None,
        stages: Sequence[str] = RESNET_STAGES,
    ) -> MaskedPoolingEncoder:
        """Encoder over a torchvision model (ImageNet normalisation)."""
        backbone = torchvision_backbone(architecture, weights_path)
        return cls(backbone, BackboneDescription("torchvision", architecture, tuple(stages)))

    def _keeper(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def keep(module: nn.Module, inputs: Any, output: Any) -> None:
            if not (isinstance(output, Tensor) and output.dim() == 4):
                raise InvalidArgument(
                    f"stage {name!r} must output a (B, C, h, w) tensor", field="backbone.stages"
                )
            self._maps[name] = output

        return keep

    def _stage_maps(self, images: Tensor) -> dict[str, Tensor]:
        self._maps = {}
        with torch.no_grad():
            self.backbone(images)
        maps, self._maps = self._maps, {}
        return maps

    def train(self, mode: bool = True) -> MaskedPoolingEncoder:
        """Switch mode for the module tree while keeping the frozen backbone in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: Tensor, masks: Tensor) -> Tensor:
        """Encode exemplars.

        images: (B, 3, H, W) float RGB in [0, 1] (unmasked); masks: (B, 1, H', W')
        float or {0, 1}. Returns (B, feature_dim) float, stage vectors concatenated
        in `description.stages` order.
        """
        maps = self._stage_maps((images - self.mean) / self.std)
        masks = masks.to(images.device)
        return torch.cat([masked_average(maps[s], masks) for s in self.description.stages], 1)

    def encode_units(self, images: Tensor, masks: Tensor, batch_size: int = 64) -> Tensor:
        """Encode every exemplar of every unit.

        images: (U, k, 3, H, W) float in [0, 1]; masks: (U, k, 1, H', W').
        Returns (U, k, feature_dim) float, computed `batch_size` exemplars at a time.
        """
        units, k = images.shape[:2]
        flat_images = images.reshape(units * k, *images.shape[2:])
        flat_masks = masks.reshape(units * k, *masks.shape[2:])
        device = self.mean.device
        parts = [
            self(
                flat_images[i : i + batch_size].to(device),
                flat_masks[i : i + batch_size].to(device),
            )
            for i in range(0, units * k, batch_size)
        ]
        return torch.cat(parts).view(units, k, self.feature_dim)
