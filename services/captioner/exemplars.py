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

DEFAULT_EXEMPLARS = 15
DEFAULT_MASK_QUANTILE = 0.99


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
