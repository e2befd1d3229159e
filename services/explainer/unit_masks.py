"""Unit masks of one image chunk, counted per label set: what both IoU methods need.

A pixel's *label set* is every label covering it: its label in each pixel plane and
every image-level label of its image (an image-level label covers the whole image),
restricted to labels of a selected category (`label_categories[l] >= 0`), label 0
never included. An image has few distinct label sets, so counting a unit's mask
pixels per label set (instead of per label and plane) is exact and cheap:

- the intersection |M_u ∩ L_c| is the sum of the counts of the sets holding c
  (a label in several planes of one pixel counts once: masks are ORs of layers);
- compositional explanations evaluate any formula on label sets.

`count_masks` thresholds one chunk of activations (n, U, h, w) against per-unit
thresholds, skipping every (image, unit) pair whose raw maximum is at or below the
threshold (its resized mask is empty, see `upsample`), and finds the mask pixels
as runs down band columns; a run inside one label set counts at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.probe_format import LabelChunk
from services.explainer.upsample import bilinear_resize

# Dense (pair, label set) counting up to this many bins, sorting beyond.
_DENSE_BINS = 1 << 24


@dataclass(frozen=True)
class LabelSets:
    """The label sets of one chunk's images and which set covers each pixel.

    Sets are numbered image by image: image i's sets are `first_set[i]` to
    `first_set[i + 1] - 1`. Rows hold a set's labels in descending order, padded
    with 0 at the end; two sets may hold the same labels.
    """

    rows: np.ndarray  # (A, K) int32
    pixel_count: np.ndarray  # (A,) int64 pixels covered by each set
    category_bits: np.ndarray  # (A,) uint64 bit c set when the set holds a label of category c
    first_set: np.ndarray  # (n + 1,) int64
    pixel_set: np.ndarray  # (n, sh, sw) int32 set index of every pixel
    image_bits: np.ndarray  # (n,) uint64 categories present anywhere in each image


def canonical_rows(rows: np.ndarray) -> np.ndarray:
    """Sort each row's labels in descending order, drop repeats, trim all-zero columns.

    `rows` (R, K) int32 with 0 for "no label" → (R, K') int32, K' <= K.
    """
    rows = -np.sort(-rows, axis=1)
    repeat = np.zeros(rows.shape, dtype=bool)
    repeat[:, 1:] = rows[:, 1:] == rows[:, :-1]
    rows[repeat] = 0
    rows = -np.sort(-rows, axis=1)
    width = int((rows != 0).sum(axis=1).max(initial=0))
    return np.ascontiguousarray(rows[:, :width])


def unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (distinct rows (A, K) in lexicographic order, index (R,) of each row among them).

    `rows` (R, K) non-negative integers. Columns are packed into one int64 key while
    it fits, and factorised when it would not, so only integer keys are sorted.
    """
    key = np.zeros(len(rows), dtype=np.int64)
    bound = 1
    for column in rows.T:
        width = int(column.max(initial=0)) + 1
        if bound * width >= 1 << 62:
            _, key = np.unique(key, return_inverse=True)
            bound = int(key.max(initial=0)) + 1
        key = key * width + column
        bound *= width
    _, first, code = np.unique(key, return_index=True, return_inverse=True)
    return rows[first], code


def category_bits(rows: np.ndarray, label_categories: np.ndarray) -> np.ndarray:
    """(A,) uint64: bit c set when a row holds a label whose category index is c."""
    bits = np.zeros(len(rows), dtype=np.uint64)
    for column in rows.T:
        category = label_categories[column]
        present = (column > 0) & (category >= 0)
        bits |= np.where(present, np.uint64(1) << category.clip(0).astype(np.uint64), 0)
    return bits


def chunk_label_sets(labels: LabelChunk, label_categories: np.ndarray) -> LabelSets:
    """Split a chunk's pixels into label sets, image by image.

    `labels.pixel` (n, P, sh, sw) int32 and `labels.image` (n, Q) int32 hold label
    numbers; `label_categories` (L + 1,) int32 is each label's category index, -1 for
    labels of no selected category (they are dropped).
    """
    n, planes = labels.pixel.shape[:2]
    size = labels.pixel.shape[2] * labels.pixel.shape[3]
    pixel = labels.pixel.reshape(n, planes, size)
    # Pixels are taken in runs of equal plane labels along each image's rows.
    start = np.zeros((n, size), dtype=bool)
    start[:, 0] = True
    for p in range(planes):
        start[:, 1:] |= pixel[:, p, 1:] != pixel[:, p, :-1]
    run_start = np.flatnonzero(start)
    image = run_start // size
    at = image * (planes * size) + run_start % size
    # A run's set: its image (which fixes the image-level labels) and its plane labels.
    key = np.empty((len(run_start), 1 + planes), dtype=np.int64)
    key[:, 0] = image
    for p in range(planes):
        key[:, 1 + p] = labels.pixel.reshape(-1)[at + p * size]
    distinct, run_set = unique_rows(key)  # sorted by image first
    raw = np.concatenate([distinct[:, 1:], labels.image[distinct[:, 0]]], axis=1)
    if raw.size and (raw.min() < 0 or raw.max() >= len(label_categories)):
        raise ValueError(
            f"label numbers must lie in [0, {len(label_categories) - 1}], "
            f"got [{raw.min()}, {raw.max()}]"
        )
    rows = canonical_rows(np.where(label_categories[raw] >= 0, raw, 0).astype(np.int32))
    run_length = np.diff(run_start, append=n * size)
    bits = category_bits(rows, label_categories)
    first_set = np.searchsorted(distinct[:, 0], np.arange(n + 1))
    return LabelSets(
        rows=rows,
        pixel_count=np.bincount(run_set, weights=run_length, minlength=len(rows)).astype(np.int64),
        category_bits=bits,
        first_set=first_set,
        pixel_set=np.repeat(run_set.astype(np.int32), run_length).reshape(
            n, *labels.pixel.shape[2:]
        ),
        image_bits=np.bitwise_or.reduceat(bits, first_set[:-1]),
    )


def band_sets(pixel_set: np.ndarray, band_start: np.ndarray) -> np.ndarray:
    """(n, B, sw) int32: the label set of each band column when uniform, else -1.

    `pixel_set` (n, sh, sw) int32; band b covers rows [band_start[b], band_start[b + 1]).
    """
    stops = [*band_start[1:], pixel_set.shape[1]]
    out = np.empty((len(pixel_set), len(band_start), pixel_set.shape[2]), dtype=np.int32)
    for b, (y0, y1) in enumerate(zip(band_start, stops, strict=True)):
        first = pixel_set[:, y0, :]
        uniform = (pixel_set[:, y0 + 1 : y1, :] == first[:, None, :]).all(axis=1)
        out[:, b, :] = np.where(uniform, first, -1)
    return out


@dataclass(frozen=True)
class MaskCounts:
    """One chunk's unit masks M_u = resize(raw_u) > T_u, counted per label set.

    A *pair* is an (image, unit) whose raw maximum exceeds the unit's threshold;
    every other pair has an empty mask and appears nowhere.
    """

    i0: int  # global index of the chunk's first image
    sets: LabelSets
    raw_max: np.ndarray  # (n, U) float32 spatial maximum of each raw map
    pair_image: np.ndarray  # (m,) int64 image index within the chunk
    pair_unit: np.ndarray  # (m,) int64 unit index within the block
    pair_area: np.ndarray  # (m,) int64 |M| of the pair
    pair_bits: np.ndarray  # (m,) uint64 categories of the labels inside the mask
    pair: np.ndarray  # (k,) int64 ┐ mask pixels of pair `pair` covered by label set `set`,
    set: np.ndarray  # (k,) int64  │ one entry per nonzero count, sorted by pair
    count: np.ndarray  # (k,) int64 ┘


def count_masks(
    acts: np.ndarray, labels: LabelChunk, thresholds: np.ndarray, label_categories: np.ndarray
) -> MaskCounts:
    """Threshold a chunk's activations and count each pair's mask pixels per label set.

    `acts` (n, U, h, w) float32 raw activations of images [labels.i0, labels.i1),
    `thresholds` (U,) float32, `label_categories` (L + 1,) int32.
    """
    acts = np.asarray(acts, dtype=np.float32)
    n, n_units = acts.shape[:2]
    if len(labels.pixel) != n:
        raise ValueError(f"activations hold {n} images, label chunk {len(labels.pixel)}")
    sets = chunk_label_sets(labels, label_categories)
    resize = bilinear_resize(acts.shape[2:], labels.pixel.shape[2:])
    uniform = band_sets(sets.pixel_set, resize.rows.band_start).reshape(-1)
    flat_sets = sets.pixel_set.reshape(-1)
    n_bands, (sh, sw) = len(resize.rows.band_start), sets.pixel_set.shape[1:]
    raw_max = acts.reshape(n, n_units, -1).max(axis=2)
    pair_image, pair_unit = np.nonzero(raw_max > thresholds)
    # Bins of pair p: one per label set of its image, from base[p] on.
    image_sets = np.diff(sets.first_set)[pair_image]
    base = np.cumsum(image_sets) - image_sets
    offset = base - sets.first_set[pair_image]  # bin = offset[p] + set
    keys, weights = [], []
    for runs in resize.runs_above(acts[pair_image, pair_unit], thresholds[pair_unit]):
        image = pair_image[runs.index]
        run_set = uniform[(image * n_bands + runs.band) * sw + runs.x]
        # Runs inside one label set count at once ...
        whole = np.flatnonzero(run_set >= 0)
        keys.append(offset[runs.index[whole]] + run_set[whole])
        weights.append(runs.length[whole])
        # ... the others pixel by pixel.
        split = np.flatnonzero(run_set < 0)
        length = runs.length[split]
        run = np.repeat(split, length)
        y = runs.y[run] + np.arange(len(run)) - np.repeat(np.cumsum(length) - length, length)
        keys.append(offset[runs.index[run]] + flat_sets[(image[run] * sh + y) * sw + runs.x[run]])
        weights.append(np.ones(len(run), dtype=np.int64))
    key, count = _count(
        np.concatenate(keys) if keys else np.zeros(0, np.int64),
        np.concatenate(weights) if weights else np.zeros(0, np.int64),
        int(image_sets.sum()),
    )
    pair = np.searchsorted(base, key, side="right") - 1
    label_set = key - offset[pair]
    first = np.flatnonzero(np.diff(pair, prepend=-1))
    pair_bits = np.zeros(len(pair_image), dtype=np.uint64)
    if len(first):
        pair_bits[pair[first]] = np.bitwise_or.reduceat(sets.category_bits[label_set], first)
    return MaskCounts(
        i0=labels.i0,
        sets=sets,
        raw_max=raw_max,
        pair_image=pair_image,
        pair_unit=pair_unit,
        pair_area=np.bincount(pair, weights=count, minlength=len(pair_image)).astype(np.int64),
        pair_bits=pair_bits,
        pair=pair,
        set=label_set,
        count=count,
    )


def _count(keys: np.ndarray, weights: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (distinct keys in increasing order, their summed integer weights)."""
    if n_bins <= _DENSE_BINS:
        sums = np.rint(np.bincount(keys, weights=weights, minlength=n_bins)).astype(np.int64)
        distinct = np.flatnonzero(sums)
        return distinct, sums[distinct]
    distinct, where = np.unique(keys, return_inverse=True)
    return distinct, np.rint(np.bincount(where, weights=weights)).astype(np.int64)
