"""A model whose `colors` units are exact colour detectors by construction (no training).

Input: (N, 3, H, W) float32 RGB with ImageNet normalisation (`preprocessing.imagenet_normalize`,
torchvision's mean and std); the model inverts it first. Layers:

- `colors`: (N, 9, H/2, W/2). Unit k < 8 matches palette colour c_k: `exp(-|rgb - c_k|² / 2σ²)`
  per pixel (σ = 0.06 in [0, 1] RGB, so any other palette colour gives < 1e-5), averaged
  over 2×2 blocks and doubled, capped at 1 (a block at least half c_k counts fully), times
  a fixed pseudo-random gain in [0.5, 1] per output position. Unit 8 is dead (always 0).
  The gain spreads a unit's top-quantile positions evenly over its colour: with exact
  palette colours every matching position would otherwise tie at the maximum, and a
  threshold at the top 0.5% would select none of them or all of them.
- `pool`: (N, 9) spatial mean of `colors`, the model's output.
- `near`: (N, 1, H/2, W/2), one unit planted on a spatial relation: the match of colour
  `NEAR[0]` (`colors` unit) where colour `NEAR[1]` matches (> 0.5) within `NEAR_REACH`
  positions (a square window), 0 elsewhere. It fires on yellow regions (shapes or
  backgrounds) only next to blue ones: `yellow CLOSE TO blue` in a spatial formula.

`planted_units()` says what each planted unit of `colors` must be dissected as.
"""

from __future__ import annotations

import torch
from torch import nn

from services.toyworld.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from services.toyworld.world import WORLD

SIGMA = 0.06
GAIN_SIZE = 256
DEAD_UNIT = len(WORLD.colors)
NEAR = ("yellow", "blue")
NEAR_REACH = 2


def planted_units() -> dict[int, str]:
    """Unit index of layer `colors` -> the label name it detects (every unit but the dead one)."""
    return dict(enumerate(WORLD.color_names))


class ColorUnits(nn.Module):
    """(N, 3, H, W) RGB in [0, 1] -> (N, 9, H/2, W/2) colour-match maps (last unit dead)."""

    palette: torch.Tensor
    gain: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        palette = torch.tensor([rgb for _, rgb in WORLD.colors], dtype=torch.float32) / 255.0
        self.register_buffer("palette", palette.view(1, -1, 3, 1, 1), persistent=False)
        generator = torch.Generator().manual_seed(0)
        gain = 0.5 + 0.5 * torch.rand((GAIN_SIZE, GAIN_SIZE), generator=generator)
        self.register_buffer("gain", gain, persistent=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 9, H // 2, W // 2) float32."""
        distance2 = ((rgb.unsqueeze(1) - self.palette) ** 2).sum(dim=2)
        # Blocks on a colour's edges count fully, or the top quantile would favour large
        # uniform regions (plain backgrounds) over striped or dotted ones.
        match = (2 * self.pool(torch.exp(-distance2 / (2 * SIGMA**2)))).clamp(max=1.0)
        h, w = match.shape[-2:]
        tiles = (-(-h // GAIN_SIZE), -(-w // GAIN_SIZE))
        match = match * self.gain.repeat(*tiles)[:h, :w]
        return torch.cat([match, torch.zeros_like(match[:, :1])], dim=1)


class NearUnit(nn.Module):
    """(N, 9, h, w) `colors` maps -> (N, 1, h, w): colour NEAR[0] where NEAR[1] is near."""

    def __init__(self) -> None:
        super().__init__()
        self.target, self.context = (WORLD.color_names.index(c) for c in NEAR)
        self.reach = nn.MaxPool2d(2 * NEAR_REACH + 1, stride=1, padding=NEAR_REACH)

    def forward(self, colors: torch.Tensor) -> torch.Tensor:
        """(N, 9, h, w) float32 -> (N, 1, h, w) float32."""
        context = (colors[:, self.context : self.context + 1] > 0.5).float()
        return colors[:, self.target : self.target + 1] * self.reach(context)


class PlantedNet(nn.Module):
    """Undo ImageNet normalisation, detect palette colours (`colors`), average them (`pool`)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.colors = ColorUnits()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.near = NearUnit()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) ImageNet-normalised -> (N, 9) mean `colors` activations.

        `near` runs on the way, for dissection (its forward hook); the output stays
        the colour means.
        """
        colors = self.colors(x * self.std + self.mean)
        self.near(colors)
        return self.pool(colors).flatten(1)


def planted_model() -> PlantedNet:
    """The planted model in eval mode (it holds no trained weights)."""
    return PlantedNet().eval()
