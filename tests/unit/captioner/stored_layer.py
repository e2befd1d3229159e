"""A layer's activations and the probe thumbnails, stored as the extractor stores them.

`colour_layer` is a known-answer probe: every image is one colour of `COLOURS`
(plus noise, like `synthetic.colour_world`'s exemplars), and unit u of the layer
fires only on images of colour `unit_colour(u)`, in a random 2×2 patch of its 4×4 map.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from services.common import keys
from services.common.activations import ActivationManifest
from services.common.store import ObjectStore
from tests.unit.captioner.synthetic import COLOURS

ACTS_KEY = "acts0"
DATASET_KEY = "probe0"
LAYER = "layer3"


def unit_colour(unit: int) -> str:
    return list(COLOURS)[unit % len(COLOURS)]


@dataclass(frozen=True)
class StoredLayer:
    acts: np.ndarray  # (N, U, h, w) float32, as stored (before any down-casting)
    images: np.ndarray  # (N, 3, S, S) uint8
    manifest: ActivationManifest


def png(image: np.ndarray) -> bytes:
    """(3, H, W) uint8 → PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def store_thumbnails(store: ObjectStore, images: np.ndarray, ids: list[int]) -> None:
    """Store images[ids] as thumbnails at their own size (the size a captioner asks for)."""
    for i in ids:
        store.put(keys.thumbnail(DATASET_KEY, i, images.shape[-1]), png(images[i]))


def store_layer(
    store: ObjectStore,
    acts: np.ndarray,
    images: np.ndarray,
    unit_block: int,
    image_chunk: int,
    dtype: str = "float32",
) -> StoredLayer:
    """Store (N, U, h, w) activations in chunks, the pooled summary, the manifest (last)."""
    n = acts.shape[0]
    manifest = ActivationManifest(
        ACTS_KEY, LAYER, acts.shape, dtype, unit_block, image_chunk, DATASET_KEY
    )
    for i0, i1 in manifest.image_ranges():
        for u0, u1 in manifest.unit_ranges():
            key = keys.acts_chunk(ACTS_KEY, LAYER, u0, u1, i0, i1)
            store.put_array(key, acts[i0:i1, u0:u1].astype(dtype))
    store.put_arrays(
        keys.pooled(ACTS_KEY, LAYER),
        {"mean": acts.mean(axis=(2, 3)), "max": acts.max(axis=(2, 3))},
    )
    store.put_json(keys.manifest(ACTS_KEY, LAYER), manifest.to_json())
    store_thumbnails(store, images, list(range(n)))
    return StoredLayer(acts, images, manifest)


def colour_layer(
    store: ObjectStore,
    n_images: int = 30,
    n_units: int = 6,
    size: int = 16,
    unit_block: int = 4,
    image_chunk: int = 7,
    seed: int = 0,
) -> StoredLayer:
    rng = np.random.default_rng(seed)
    colours = [unit_colour(i) for i in range(n_images)]
    images = rng.integers(0, 40, size=(n_images, 3, size, size)).astype(np.uint8)
    for i, colour in enumerate(colours):
        images[i] += np.array(COLOURS[colour], dtype=np.uint8)[:, None, None]
    acts = rng.random((n_images, n_units, 4, 4)).astype(np.float32) * 0.1
    for i, colour in enumerate(colours):
        for u in range(n_units):
            if unit_colour(u) == colour:
                y, x = rng.integers(0, 3, size=2)
                acts[i, u, y : y + 2, x : x + 2] += 1.0 + rng.random()
    return store_layer(store, acts, images, unit_block, image_chunk)
