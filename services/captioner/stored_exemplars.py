"""A unit block's exemplars, read from the object store only (no dataset, no model).

From one layer's stored activations (`services.common.activations`):

- each unit's top-k images by spatial max come from the stored pooled maxima (N, U);
- one streaming pass over the block's stored chunks gives every unit's threshold
  η_u (`StreamedThresholds`) and its maps on its exemplars, holding one image chunk
  of the block's units (plus η_u's tail) at a time;
- exemplar images are the PNG thumbnails under `keys.thumbnail` (stored by the
  extractor's Materialize), decoded to RGB and resized to the captioner's square
  input size. The extractor feeds its models square resized images, never crops,
  so the maps cover the whole image.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from services.captioner.exemplars import (
    StreamedThresholds,
    exemplar_masks,
    gather_exemplar_maps,
    top_images,
)
from services.common import keys
from services.common.activations import ActivationManifest, iter_units
from services.common.errors import FailedPrecondition
from services.common.store import ObjectStore


@dataclass(frozen=True)
class BlockExemplars:
    """The exemplars of units [u0, u1) of a layer."""

    u0: int
    u1: int
    image_ids: np.ndarray  # (U, k) int64 probe image ids, best first
    maps: np.ndarray  # (U, k, h, w) float32 raw activation maps on those images
    thresholds: np.ndarray  # (U,) float64 η_u

    def masks(self, size: int) -> np.ndarray:
        """(U, k, 1, size, size) uint8 {0, 1}: maps upsampled to the images, > η_u."""
        return exemplar_masks(self.maps, self.thresholds, (size, size))


def block_exemplars(
    store: ObjectStore,
    manifest: ActivationManifest,
    unit_max: np.ndarray,
    u0: int,
    u1: int,
    k: int,
    quantile: float,
) -> BlockExemplars:
    """Top-k images, η_u and exemplar maps of units [u0, u1).

    unit_max: (N, U) the layer's stored spatial maxima (`read_pooled`).
    """
    n_images, _, h, w = manifest.shape
    top = top_images(unit_max[:, u0:u1], k)
    maps = np.zeros((u1 - u0, k, h, w), dtype=np.float32)
    thresholds = StreamedThresholds(n_images * h * w, quantile)
    for i0, acts in iter_units(store, manifest, u0, u1):
        thresholds.update(acts)
        gather_exemplar_maps(maps, top, i0, acts)
    return BlockExemplars(u0, u1, top, maps, thresholds.thresholds())


def missing_thumbnails(
    store: ObjectStore, dataset_key: str, image_ids: Sequence[int], size: int
) -> list[int]:
    """The ids among `image_ids` that have no stored thumbnail of `size` pixels yet."""
    return [i for i in image_ids if not store.exists(keys.thumbnail(dataset_key, i, size))]


def read_thumbnails(
    store: ObjectStore, dataset_key: str, image_ids: Sequence[int], size: int
) -> np.ndarray:
    """Stored thumbnails as (len(image_ids), 3, size, size) uint8 RGB, resized bilinearly."""
    out = np.empty((len(image_ids), 3, size, size), dtype=np.uint8)
    for row, image_id in enumerate(image_ids):
        key = keys.thumbnail(dataset_key, image_id, size)
        try:
            with Image.open(io.BytesIO(store.get(key))) as image:
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise FailedPrecondition(
                f"the thumbnail {key!r} is not an image ({exc})", field="dataset_key"
            ) from exc
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        out[row] = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    return out
