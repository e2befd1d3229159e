"""Stored activations of one layer: manifest, chunk reads and pooled summaries.

A layer's activations are (N, U, h, w) (conv maps; ViT tokens reshaped to a √T×√T
grid; linear outputs as 1×1), stored as chunks of `unit_block` units × `image_chunk`
images under `keys.acts_chunk`. The manifest is written last, when every chunk and
the pooled summaries exist, so its presence means the layer is complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from services.common import keys
from services.common.errors import InvalidArgument, NotFound
from services.common.spec_vocabulary import NAME
from services.common.store import ObjectStore

# Units per stored chunk: extraction's own chunking, part of the acts key. The explain
# blocks (`compute.unit_block_size`) are apart from it: a block reads its columns from
# whichever chunks it overlaps (`read_units`), so changing the block size reuses the
# stored activations.
STORED_UNIT_BLOCK = 64


@dataclass
class ActivationManifest:
    """Shape and chunking of one layer's stored activations."""

    acts_key: str
    layer: str
    shape: tuple[int, int, int, int]  # (N, U, h, w)
    dtype: str  # "float16" | "float32"
    unit_block: int
    image_chunk: int
    dataset_key: str

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ActivationManifest:
        """Build from the dict written by `to_json`."""
        data = dict(data)
        data["shape"] = tuple(data["shape"])
        return cls(**data)

    @property
    def n_images(self) -> int:
        """N, the number of probe images."""
        return self.shape[0]

    @property
    def n_units(self) -> int:
        """U, the number of units."""
        return self.shape[1]

    def image_ranges(self) -> list[tuple[int, int]]:
        """Image ranges [i0, i1) of the stored chunks."""
        n = self.n_images
        return [(i0, min(i0 + self.image_chunk, n)) for i0 in range(0, n, self.image_chunk)]

    def unit_ranges(self) -> list[tuple[int, int]]:
        """Unit ranges [u0, u1) of the stored chunks."""
        u = self.n_units
        return [(u0, min(u0 + self.unit_block, u)) for u0 in range(0, u, self.unit_block)]


def check_name(value: str, field: str) -> str:
    """Return a request's job id, layer or key `value`; InvalidArgument naming `field` if bad."""
    if not value:
        raise InvalidArgument("must not be empty", field)
    if not NAME.match(value):
        raise InvalidArgument(
            f"{value!r} may hold only letters, digits, '_', '.' and '-' (at most 200)", field
        )
    return value


def read_manifest(store: ObjectStore, acts_key: str, layer: str) -> ActivationManifest:
    """Load the manifest of a completely extracted layer."""
    return ActivationManifest.from_json(store.get_json(keys.manifest(acts_key, layer)))


def requested_manifest(
    store: ObjectStore, acts_key: str, layer: str, dataset_key: str
) -> ActivationManifest:
    """The manifest a request names, extracted on `dataset_key` (empty: whichever it was).

    Raises NotFound (field `acts_key`) when the layer was not extracted, InvalidArgument
    (field `dataset_key`) when it was extracted on another dataset.
    """
    try:
        manifest = read_manifest(store, acts_key, layer)
    except NotFound:
        raise NotFound(
            f"no stored activations of layer {layer!r} under {acts_key!r} (extract them first)",
            "acts_key",
        ) from None
    if dataset_key and dataset_key != manifest.dataset_key:
        raise InvalidArgument(
            f"the activations under {acts_key!r} were extracted on dataset"
            f" {manifest.dataset_key!r}, not {dataset_key!r}",
            "dataset_key",
        )
    return manifest


def requested_units(start: int, end: int, manifest: ActivationManifest) -> tuple[int, int]:
    """A request's unit range [start, end), end 0 = to the last unit, checked against the layer.

    InvalidArgument naming `unit_start` or `unit_end` when it is outside the layer.
    """
    n_units, layer = manifest.n_units, manifest.layer
    end = end or n_units
    if not 0 <= start < n_units:
        raise InvalidArgument(
            f"{start} is outside [0, {n_units}) (layer {layer!r} has {n_units} units)",
            "unit_start",
        )
    if not start < end <= n_units:
        raise InvalidArgument(f"{end} is outside ({start}, {n_units}] (0 = {n_units})", "unit_end")
    return start, end


def read_units(
    store: ObjectStore,
    manifest: ActivationManifest,
    u0: int,
    u1: int,
    i0: int,
    i1: int,
    as_stored: bool = False,
) -> np.ndarray:
    """Return activations of units [u0, u1) on images [i0, i1): (i1-i0, u1-u0, h, w) float32.

    `i0, i1` must be a stored image range; units may span several stored unit blocks.
    `as_stored` keeps the stored dtype (float16 or float32) instead of converting.
    """
    parts = []
    for b0, b1 in manifest.unit_ranges():
        if b1 <= u0 or b0 >= u1:
            continue
        chunk = store.get_array(keys.acts_chunk(manifest.acts_key, manifest.layer, b0, b1, i0, i1))
        parts.append(chunk[:, max(u0, b0) - b0 : min(u1, b1) - b0])
    acts = np.concatenate(parts, axis=1)
    return acts if as_stored else acts.astype(np.float32, copy=False)


def iter_units(
    store: ObjectStore, manifest: ActivationManifest, u0: int, u1: int, as_stored: bool = False
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (i0, activations (n, u1-u0, h, w) float32) over all image chunks, in order.

    Memory is one image chunk of the requested units, whatever the dataset size.
    `as_stored` keeps the stored dtype (as `read_units`).
    """
    for i0, i1 in manifest.image_ranges():
        yield i0, read_units(store, manifest, u0, u1, i0, i1, as_stored)


def read_pooled(store: ObjectStore, acts_key: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the layer's spatial (mean, max) per image and unit: two (N, U) float32 arrays."""
    arrays = store.get_arrays(keys.pooled(acts_key, layer))
    return arrays["mean"].astype(np.float32), arrays["max"].astype(np.float32)


def iter_pooled(
    store: ObjectStore, manifest: ActivationManifest, kind: str
) -> Iterator[np.ndarray]:
    """Yield each stored image chunk's (n, U) float32 spatial `kind` ("mean" | "max"), in order.

    The chunks the extractor stores before the whole layer's `pooled.npz`, with the same
    values: memory is one chunk, whatever the number of images.
    """
    for i0, i1 in manifest.image_ranges():
        arrays = store.get_arrays(keys.pooled_chunk(manifest.acts_key, manifest.layer, i0, i1))
        yield arrays[kind].astype(np.float32)
