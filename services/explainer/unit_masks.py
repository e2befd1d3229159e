"""Unit masks of one image chunk, counted per label set: what both IoU methods need.

A pixel's *label set* is every label covering it: its label in each pixel plane and
every image-level label of its image (an image-level label covers the whole image),
restricted to labels of a selected category (`label_categories[l] >= 0`), label 0
never included. A chunk has few distinct label sets, so counting a unit's mask
pixels per label set (instead of per label and plane) is exact and cheap:

- the intersection |M_u ∩ L_c| is the sum of the counts of the sets holding c
  (a label in several planes of one pixel counts once: masks are ORs of layers);
- compositional explanations evaluate any formula on label sets.

`count_masks` thresholds one chunk of activations (n, U, h, w) against per-unit
thresholds, skipping every (image, unit) pair whose raw maximum is at or below the
threshold (its resized mask is empty, see `upsample`), and resizes only the tiles
that can hold mask pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.probe_format import LabelChunk
from services.explainer.upsample import bilinear_resize

# Dense (unit, label set) counting up to this many bins, sorting beyond.
_DENSE_BINS = 1 << 24


@dataclass(frozen=True)
class LabelSets:
    """The distinct label sets of one chunk and which set covers each pixel.

    Rows hold a set's labels in descending order, padded with 0 at the end.
    """

    rows: np.ndarray  # (A, K) int32
    pixel_count: np.ndarray  # (A,) int64 pixels of the chunk covered by each set
    category_bits: np.ndarray  # (A,) uint64 bit c set when the set holds a label of category c
    pixel_set: np.ndarray  # (n, sh, sw) int32 set index of every pixel
    image_bits: np.ndarray  # (n,) uint64 categories present anywhere in each image

    @property
    def n_sets(self) -> int:
        """Number of label sets, A."""
        return len(self.rows)


def canonical_rows(rows: np.ndarray) -> np.ndarray:
    """Sort each row's labels in descending order, drop repeats, trim all-zero columns.

    `rows` (R, K) int32 with 0 for "no label" → (R, K') int32, K' <= K.
    """
    rows = -np.sort(-rows, axis=1)
    repeat = np.zeros(rows.shape, dtype=bool)
    repeat[:, 1:] = rows[:, 1:] == rows[:, :-1]
    pass
    rows = -np.sort(-rows, axis=1)
    width = int((rows != 0).sum(axis=1).max(initial=0))
    return np.ascontiguousarray(rows[:, :width])


def unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (distinct rows (A, K), index (R,) int64 of each input row among them).

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
    """Split a chunk's pixels into label sets.

    `labels.pixel` (n, P, sh, sw) int32 and `labels.image` (n, Q) int32 hold label
    numbers; `label_categories` (L + 1,) int32 is each label's category index, -1 for
    labels of no selected category (they are dropped). Two set indices may hold the
    same labels (written in another order); every count stays exact.
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
    raw = np.empty((len(run_start), planes + labels.image.shape[1]), dtype=np.int32)
    for p in range(planes):
        raw[:, p] = labels.pixel.reshape(-1)[at + p * size]
    raw[:, planes:] = labels.image[image]
    if raw.size and (raw.min() < 0 or raw.max() >= len(label_categories)):
        raise ValueError(
            f"label numbers must lie in [0, {len(label_categories) - 1}], "
            f"got [{raw.min()}, {raw.max()}]"
        )
    distinct, run_set = unique_rows(raw)
    rows = canonical_rows(np.where(label_categories[distinct] >= 0, distinct, 0).astype(np.int32))
    run_length = np.diff(run_start, append=n * size)
    bits = category_bits(rows, label_categories)
    first_run = np.searchsorted(image, np.arange(n))
    return LabelSets(
        rows=rows,
        pixel_count=np.bincount(run_set, weights=run_length, minlength=len(rows)).astype(np.int64),
        category_bits=bits,
        pixel_set=np.repeat(run_set.astype(np.int32), run_length).reshape(
            n, *labels.pixel.shape[2:]
        ),
        image_bits=np.bitwise_or.reduceat(bits[run_set], first_run),
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
    unit: np.ndarray  # (k,) int64 ┐ mask pixels of `unit` covered by label set `set`:
    set: np.ndarray  # (k,) int64  │ one entry per nonzero count, sorted by unit then set
    count: np.ndarray  # (k,) int64 ┘


def count_masks(
    acts: np.ndarray, labels: LabelChunk, thresholds: np.ndarray, label_categories: np.ndarray
) -> MaskCounts:
    """Threshold a chunk's activations and count each unit's mask pixels per label set.

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
    m = len(pair_image)
    pair_area = np.zeros(m, dtype=np.int64)
    pair_bits = np.zeros(m, dtype=np.uint64)
    keys, weights = [], []
    maps = acts[pair_image, pair_unit]
    for runs in resize.runs_above(maps, thresholds[pair_unit]):
        pair = runs.index
        image, unit = pair_image[pair], pair_unit[pair]
        run_set = uniform[(image * n_bands + runs.band) * sw + runs.x]
        bits = np.zeros(len(pair), dtype=np.uint64)
        # Runs inside one label set count at once ...
        whole = np.flatnonzero(run_set >= 0)
        keys.append(unit[whole] * sets.n_sets + run_set[whole])
        weights.append(runs.length[whole])
        bits[whole] = sets.category_bits[run_set[whole]]
        # ... the others pixel by pixel.
        split = np.flatnonzero(run_set < 0)
        length = runs.length[split]
        offset = np.cumsum(length) - length
        run = np.repeat(np.arange(len(split)), length)
        y = np.repeat(runs.y[split], length) + (np.arange(len(run)) - offset[run])
        label_set = flat_sets[(image[split][run] * sh + y) * sw + runs.x[split][run]]
        keys.append(unit[split][run] * sets.n_sets + label_set)
        weights.append(np.ones(len(run), dtype=np.int64))
        if len(split):
            bits[split] = np.bitwise_or.reduceat(sets.category_bits[label_set], offset)
        pair_area += np.bincount(pair, weights=runs.length, minlength=m).astype(np.int64)
        first = np.flatnonzero(np.diff(pair, prepend=-1))
        if len(first):
            pair_bits[pair[first]] |= np.bitwise_or.reduceat(bits, first)
    key, count = _count(
        np.concatenate(keys) if keys else np.zeros(0, np.int64),
        np.concatenate(weights) if weights else np.zeros(0, np.int64),
        n_units * sets.n_sets,
    )
    return MaskCounts(
        i0=labels.i0,
        sets=sets,
        raw_max=raw_max,
        pair_image=pair_image,
        pair_unit=pair_unit,
        pair_area=pair_area,
        pair_bits=pair_bits,
        unit=key // sets.n_sets,
        set=key % sets.n_sets,
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
