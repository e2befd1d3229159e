"""A model whose `colors` units are exact colour detectors by construction (no training).

Input: (N, 3, H, W) float32 RGB with ImageNet normalisation (`preprocessing.imagenet_normalize`,
torchvision's mean and std); the model inverts it first. Layers:

- `match`: (N, 8, H, W), each palette colour's per-pixel match (below).
- `colors`: (N, 9, H/2, W/2). Unit k < 8 matches palette colour c_k: `exp(-|rgb - c_k|² / 2σ²)`
  per pixel (σ = 0.06 in [0, 1] RGB, so any other palette colour gives < 1e-5), averaged
  over 2×2 blocks and doubled, capped at 1 (a block at least half c_k counts fully), times
  a fixed pseudo-random gain in [0.5, 1] per output position. Unit 8 is dead (always 0).
  The gain spreads a unit's top-quantile positions evenly over its colour: with exact
  palette colours every matching position would otherwise tie at the maximum, and a
  threshold at the top 0.5% would select none of them or all of them.
- `pool`: (N, 9) spatial mean of `colors`, the model's output.
- `regions`: (N, 8, H, W), the same colours at full input resolution, for looking at
  units: unit k is colour k's pixel match times `1 + s`, where s is the share of the
  image in colour k. The gain is constant within an image, so a dataset-wide threshold
  below an image's gain keeps its whole colour region and nothing else, and the images
  with most of the colour rank first. A unit's upsampled mask (what the web UI tints)
  is then its colour's region to the pixel, with no interpolation at the report's
  resolution when the images are drawn at it.
- `near`: (N, 1, H/2, W/2), one unit planted on a spatial relation between a shape and a
  colour: it fires on the pixels of rings (`NEAR[0]`) only where colour `NEAR[1]` matches
  (> 0.5 in `colors`) within `NEAR_REACH` positions (a square window), 0 elsewhere:
  `ring CLOSE TO blue` in a spatial formula. A ring is found by construction, not
  learned: a connected region of one palette colour that does not touch the image's border
  and encloses a hole (the toy world's shapes never overlap and never share a colour with
  the background or its pattern, and only rings have holes). Its pixel map is pooled and
  gained like the `colors` units.

`planted_units()` says what each planted unit of `colors` must be dissected as.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from services.toyworld.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from services.toyworld.world import WORLD

SIGMA = 0.06
GAIN_SIZE = 256
DEAD_UNIT = len(WORLD.colors)
NEAR = ("ring", "blue")
NEAR_REACH = 2


def planted_units() -> dict[int, str]:
    """Unit index of layer `colors` -> the label name it detects (every unit but the dead one)."""
    return dict(enumerate(WORLD.color_names))


def tiled_gain(gain: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The (GAIN_SIZE, GAIN_SIZE) gain repeated to cover (h, w), cut to (h, w)."""
    return gain.repeat(-(-h // GAIN_SIZE), -(-w // GAIN_SIZE))[:h, :w]


class PaletteMatch(nn.Module):
    """(N, 3, H, W) RGB in [0, 1] -> (N, 8, H, W): `exp(-|rgb - c_k|² / 2σ²)` per pixel."""

    palette: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        palette = torch.tensor([rgb for _, rgb in WORLD.colors], dtype=torch.float32) / 255.0
        self.register_buffer("palette", palette.view(1, -1, 3, 1, 1), persistent=False)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 8, H, W) float32 in [0, 1]."""
        distance2 = ((rgb.unsqueeze(1) - self.palette) ** 2).sum(dim=2)
        return torch.exp(-distance2 / (2 * SIGMA**2))


class ColorUnits(nn.Module):
    """(N, 8, H, W) palette match -> (N, 9, H/2, W/2) colour-match maps (last unit dead)."""

    gain: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        gain = 0.5 + 0.5 * torch.rand((GAIN_SIZE, GAIN_SIZE), generator=generator)
        self.register_buffer("gain", gain, persistent=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, match: torch.Tensor) -> torch.Tensor:
        """(N, 8, H, W) in [0, 1] -> (N, 9, H // 2, W // 2) float32."""
        # Blocks on a colour's edges count fully, or the top quantile would favour large
        # uniform regions (plain backgrounds) over striped or dotted ones.
        match = (2 * self.pool(match)).clamp(max=1.0)
        match = match * tiled_gain(self.gain, *match.shape[-2:])
        return torch.cat([match, torch.zeros_like(match[:, :1])], dim=1)


class RegionUnits(nn.Module):
    """(N, 8, H, W) palette match -> (N, 8, H, W): colour k's match × (1 + its image share)."""

    def forward(self, match: torch.Tensor) -> torch.Tensor:
        """(N, 8, H, W) in [0, 1] -> (N, 8, H, W) float32, values in [0, 2]."""
        return match * (1 + match.mean(dim=(2, 3), keepdim=True))


def ring_pixels(rgb: np.ndarray) -> np.ndarray:
    """(3, H, W) RGB in [0, 1] -> (H, W) bool: the pixels of rings.

    A ring is a 4-connected region of one palette colour that does not touch the border
    and whose filled outline is larger than itself (it encloses a hole).
    """
    palette = np.array([rgb for _, rgb in WORLD.colors], dtype=np.float32) / 255.0
    distance2 = ((rgb[None] - palette[:, :, None, None]) ** 2).sum(axis=1)  # (C, H, W)
    rings = np.zeros(rgb.shape[1:], dtype=bool)
    for match in distance2 < (3 * SIGMA) ** 2:
        regions, n = ndimage.label(match)
        border = np.unique(np.concatenate(
            [regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
        for k in range(1, n + 1):
            if k in border:
                continue
            region = regions == k
            if ndimage.binary_fill_holes(region).sum() > region.sum():
                rings |= region
    return rings


class NearUnit(nn.Module):
    """(N, 3, H, W) RGB and (N, 9, h, w) `colors` -> (N, 1, h, w): rings where blue is near."""

    gain: torch.Tensor

    def __init__(self, gain: torch.Tensor) -> None:
        super().__init__()
        self.context = WORLD.color_names.index(NEAR[1])
        self.register_buffer("gain", gain, persistent=False)
        self.pool = nn.AvgPool2d(2)
        self.reach = nn.MaxPool2d(2 * NEAR_REACH + 1, stride=1, padding=NEAR_REACH)

    def forward(self, rgb: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1], (N, 9, H // 2, W // 2) -> (N, 1, H // 2, W // 2) float32."""
        pixels = np.stack([ring_pixels(image) for image in rgb.detach().cpu().numpy()])
        ring = torch.from_numpy(pixels[:, None]).to(rgb.device, torch.float32)
        ring = (2 * self.pool(ring)).clamp(max=1.0)
        ring = ring * tiled_gain(self.gain, *ring.shape[-2:])
        context = (colors[:, self.context : self.context + 1] > 0.5).float()
        return ring * self.reach(context)


class PlantedNet(nn.Module):
    """Undo ImageNet normalisation, detect palette colours (`colors`), average them (`pool`).

    `near` and `regions` run on the way, for dissection (their forward hooks).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.match = PaletteMatch()
        self.colors = ColorUnits()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.near = NearUnit(self.colors.gain)
        self.regions = RegionUnits()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) ImageNet-normalised -> (N, 9) mean `colors` activations."""
        rgb = x * self.std + self.mean
        match = self.match(rgb)
        colors = self.colors(match)
        self.near(rgb, colors)
        self.regions(match)
        return self.pool(colors).flatten(1)


def planted_model() -> PlantedNet:
    """The planted model in eval mode (it holds no trained weights)."""
    return PlantedNet().eval()
