"""A unit's exemplars: its top probe images and where in them it fires.

Pure functions over NumPy arrays. Activations are raw layer outputs, (N, U, h, w)
for N images and U units (linear layers as 1×1 maps, ViT tokens already on their
√T×√T grid). For each unit u:

- its exemplars are the k images with the highest spatial max of its map;
- its mask threshold η_u is the exact q-quantile (q = 0.99) of all its raw
  activations over the dataset (every image, every position);
- an exemplar's mask is the map upsampled bilinearly (align_corners=False) to the
  image size, thresholded > η_u.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from services.common.errors import InvalidArgument
from services.common.spec_vocabulary import MASK_QUANTILE, MILAN_EXEMPLARS

DEFAULT_EXEMPLARS = MILAN_EXEMPLARS.default
DEFAULT_MASK_QUANTILE = MASK_QUANTILE.default


def spatial_max(acts: np.ndarray) -> np.ndarray:
    """Per-image, per-unit maximum over positions: (N, U, h, w) → (N, U)."""
    return acts.max(axis=(2, 3))


def top_images(unit_max: np.ndarray, k: int = DEFAULT_EXEMPLARS) -> np.ndarray:
    """Indices of each unit's k images with the highest spatial max, best first.

    unit_max: (N, U), e.g. `spatial_max(acts)` or the stored pooled maxima.
    Returns (U, k) int64; ties go to the lower image index.
    """
    n_images = unit_max.shape[0]
    if not 1 <= k <= n_images:
        raise InvalidArgument(f"is {k}; must be between 1 and {n_images} images", "exemplars")
    order = np.argsort(-unit_max.T.astype(np.float64), axis=1, kind="stable")
    return order[:, :k].astype(np.int64)


def unit_thresholds(acts: np.ndarray, quantile: float = DEFAULT_MASK_QUANTILE) -> np.ndarray:
    """η_u: the exact `quantile` of every raw activation of each unit.

    acts: (N, U, h, w) over the whole dataset. Returns (U,) float64 (linear
    interpolation between order statistics, NumPy's default).
    """
    if not 0.0 <= quantile <= 1.0:
        raise InvalidArgument(f"is {quantile}; must be in [0, 1]", "mask_quantile")
    per_unit = np.moveaxis(acts, 1, 0).reshape(acts.shape[1], -1)
    return np.quantile(per_unit.astype(np.float64), quantile, axis=1)


def exemplar_masks(
    maps: np.ndarray, thresholds: np.ndarray, image_size: tuple[int, int]
) -> np.ndarray:
    """Binary masks of where each unit fires in each of its exemplars.

    maps: (U, k, h, w), each unit's raw maps on its k exemplars; thresholds: (U,)
    from `unit_thresholds`; image_size: (H, W). Returns (U, k, 1, H, W) uint8 in
    {0, 1}: the maps upsampled bilinearly (align_corners=False), then > η_u.
    """
    units, k, h, w = maps.shape
    upsampled = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)).view(units * k, 1, h, w),
        size=image_size,
        mode="bilinear",
        align_corners=False,
    ).view(units, k, 1, *image_size)
    eta = torch.from_numpy(thresholds.astype(np.float32)).view(units, 1, 1, 1, 1)
    return (upsampled > eta).numpy().astype(np.uint8)


class StreamedThresholds:
    """η_u computed over activations streamed in image chunks, exactly as `unit_thresholds`.

    The q-quantile interpolates between the order statistics at ranks ⌊q(M−1)⌋ and
    the next one, M = N·h·w values per unit, so only the tail from those ranks to
    the nearer end needs keeping: about (1 − q)·M values per unit for q = 0.99.
    Memory is one chunk plus that tail, for the units of one block.
    """

    def __init__(self, n_values: int, quantile: float = DEFAULT_MASK_QUANTILE) -> None:
        if not 0.0 <= quantile <= 1.0:
            raise InvalidArgument(f"is {quantile}; must be in [0, 1]", "mask_quantile")
        if n_values < 1:
            raise InvalidArgument(f"is {n_values}; must be at least 1", "n_values")
        self.n_values = n_values
        self.position = quantile * (n_values - 1)
        self.low = min(int(np.floor(self.position)), n_values - 1)
        self.high = min(self.low + 1, n_values - 1)
        # Keep the largest values (ranks low..M−1) or the smallest (ranks 0..high).
        self.keep_top = self.low >= n_values // 2
        self.width = n_values - self.low if self.keep_top else self.high + 1
        self.seen = 0
        self._kept: np.ndarray | None = None

    def update(self, acts: np.ndarray) -> None:
        """Add one chunk of every unit's activations: (n, U, h, w)."""
        values = np.moveaxis(acts, 1, 0).reshape(acts.shape[1], -1).astype(np.float32)
        self.seen += values.shape[1]
        if self.seen > self.n_values:
            raise InvalidArgument(
                f"got {self.seen} values per unit, more than {self.n_values}", "n_values"
            )
        merged = values if self._kept is None else np.concatenate([self._kept, values], axis=1)
        if merged.shape[1] > self.width:
            if self.keep_top:
                cut = merged.shape[1] - self.width
                merged = np.partition(merged, cut, axis=1)[:, cut:]
            else:
                merged = np.partition(merged, self.width - 1, axis=1)[:, : self.width]
        self._kept = merged

    def thresholds(self) -> np.ndarray:
        """(U,) float64 η_u, once all M values per unit were added."""
        if self._kept is None or self.seen != self.n_values:
            raise InvalidArgument(f"got {self.seen} of {self.n_values} values per unit", "n_values")
        kept = np.sort(self._kept, axis=1).astype(np.float64)
        first = 0 if self.keep_top else self.low
        a, b = kept[:, first], kept[:, first + self.high - self.low]
        # NumPy's linear interpolation, including its form for t ≥ 0.5, so that the
        # result equals np.quantile's bit for bit.
        t = self.position - self.low
        return b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t


def gather_exemplar_maps(maps: np.ndarray, top: np.ndarray, i0: int, acts: np.ndarray) -> None:
    """Copy the maps of the exemplars that fall in one image chunk into `maps`.

    maps: (U, k, h, w) float32, filled in place; top: (U, k) image ids from
    `top_images`; acts: (n, U, h, w), the chunk of images [i0, i0 + n).
    """
    in_chunk = (top >= i0) & (top < i0 + acts.shape[0])
    units, slots = np.nonzero(in_chunk)
    maps[units, slots] = acts[top[units, slots] - i0, units]
