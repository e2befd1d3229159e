"""A probe set's label maps decoded once per layer grid and stored for every unit block.

Counting a unit's mask pixels per label set (`unit_masks.count_decoded`) needs, of the
labels, only their `DecodedLabels`: the label sets of each image, every pixel's set
and the band columns of the grid's resize. They depend on the probe set, its selected
categories and the row banding of the layer's grid (h → sh), never on the units, so
they are decoded once per chunk (`store_missing`, one Ray task per chunk) and stored
under a content key (`decoded_key`): every unit block of every layer with that grid,
in this job and later ones, reads them (`read_decoded`) chunk by chunk, so the cost of
a tally no longer grows with the number of unit blocks, and a block's memory stays
that of one chunk. A chunk is stored uncompressed (`array_io.packed_bytes`: int16
pixel sets and band columns, about 32 KB per 112×112 image) and read back as views
without copies: reading it must cost far less than decoding it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import ray

from services.common import array_io, keys
from services.common.errors import NotFound
from services.common.probe_format import ConceptTable, read_label_chunk
from services.common.settings import Settings
from services.common.store import ObjectStore
from services.explainer.sharding import BlockOutcome, attempt_number, block_task, gather
from services.explainer.unit_masks import DecodedLabels, decode_labels
from services.explainer.upsample import bilinear_resize

# Changes whenever the stored arrays' meaning changes.
DECODED_VERSION = 1


def grid_bands(table: ConceptTable, grid: tuple[int, int]) -> np.ndarray:
    """(B,) int64 first mask row of each row band of the resize from `grid` (h, w)."""
    return bilinear_resize(grid, table.mask_size).rows.band_start


def decoded_key(table: ConceptTable, band_start: np.ndarray) -> str:
    """Content key of the decoded labels: probe set, categories, mask size, row bands."""
    return keys.content_key(
        "decoded-labels",
        DECODED_VERSION,
        table.dataset_key,
        list(table.mask_size),
        table.label_categories().tolist(),
        band_start.tolist(),
    )


def decode_chunk(
    store: ObjectStore, table: ConceptTable, band_start: np.ndarray, i0: int, i1: int
) -> DecodedLabels:
    """Decode the stored label chunk of images [i0, i1) and store it under its content key."""
    labels = read_label_chunk(store, table.dataset_key, i0, i1)
    decoded = decode_labels(labels, table.label_categories(), band_start)
    key = keys.decoded_labels(table.dataset_key, decoded_key(table, band_start), i0, i1)
    store.put(key, array_io.packed_bytes(decoded.to_arrays()))
    return decoded


def read_decoded(
    store: ObjectStore, table: ConceptTable, band_start: np.ndarray, i0: int, i1: int
) -> DecodedLabels:
    """The decoded labels of images [i0, i1), decoded and stored first if missing."""
    key = keys.decoded_labels(table.dataset_key, decoded_key(table, band_start), i0, i1)
    try:
        data = store.get(key)
    except NotFound:
        return decode_chunk(store, table, band_start, i0, i1)
    return DecodedLabels.from_arrays(i0, array_io.packed_arrays(data))


@block_task
def decode_task(
    settings: Settings, table: ConceptTable, band_start: np.ndarray, i0: int, i1: int
) -> BlockOutcome:
    """Decode and store one chunk in a Ray task (the outcome's range is the image range)."""
    decode_chunk(settings.open_store(), table, band_start, i0, i1)
    return BlockOutcome(i0, i1, attempt_number(), computed=True)


def store_missing(
    settings: Settings,
    store: ObjectStore,
    table: ConceptTable,
    band_start: np.ndarray,
    is_active: Callable[[], bool],
) -> Iterator[str]:
    """Decode and store every chunk not stored yet, one Ray task each; yield progress."""
    digest = decoded_key(table, band_start)
    prefix = keys.decoded_labels(table.dataset_key, digest, 0, 0).rsplit("/", 1)[0] + "/"
    stored = set(store.list(prefix))
    missing = [
        (i0, i1)
        for i0, i1 in table.chunk_ranges()
        if keys.decoded_labels(table.dataset_key, digest, i0, i1) not in stored
    ]
    if not missing:
        return
    shared = ray.put(table)  # once, not once per task: it lists every image's name
    refs = [decode_task.remote(settings, shared, band_start, i0, i1) for i0, i1 in missing]
    done = table.n_images - sum(i1 - i0 for i0, i1 in missing)
    for outcome in gather(refs, is_active):
        done += outcome.u1 - outcome.u0
        yield f"label sets decoded for the grid: {done}/{table.n_images} images"
