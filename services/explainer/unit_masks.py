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
as runs down band columns (`BilinearResize.column_runs`). Each band column's sets
are known beforehand (`band_columns`): most hold one set, or two with one split
row, so a run counts in at most two additions, and runs shared by neighbouring
columns of alike band columns count at once; columns holding more sets count
pixel by pixel. Image groups of `_GROUP_IMAGES` bound the working arrays.

What depends only on the labels and the layer's grid (the label sets, each pixel's
set, the band columns) is `decode_labels`' `DecodedLabels`, made once per chunk and
grid and stored (`services/explainer/decoded_labels.py`), so every unit block
counts against it (`count_decoded`) instead of decoding the label maps again.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from services.common.probe_format import LabelChunk
from services.explainer.upsample import BilinearResize, TileRuns, bilinear_resize, expand_ranges


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
    image_bits: np.ndarray  # (n,) uint64 categories present anywhere in each image
    # `pixel_set` of consecutive groups of images, each from its first set on:
    # (group's first set, (n_g, sh, sw) int16 or int32 set index minus it).
    pixel_set_parts: tuple[tuple[int, np.ndarray], ...]

    @functools.cached_property
    def pixel_set(self) -> np.ndarray:
        """(n, sh, sw) int32 set index of every pixel."""
        return np.concatenate(
            [part.astype(np.int32) + first for first, part in self.pixel_set_parts]
        )


def canonical_rows(rows: np.ndarray) -> np.ndarray:
    """Sort each row's labels in descending order, drop repeats, trim all-zero columns.

    `rows` (R, K) int32 with 0 for "no label" → (R, K') int32, K' <= K.
    """
    rows = _sort_descending(rows)
    repeat = np.zeros(rows.shape, dtype=bool)
    repeat[:, 1:] = rows[:, 1:] == rows[:, :-1]
    rows[repeat] = 0
    rows = _sort_descending(rows)
    width = int((rows != 0).sum(axis=1).max(initial=0))
    return np.ascontiguousarray(rows[:, :width])


def _sort_descending(rows: np.ndarray) -> np.ndarray:
    """Each row of (R, K) sorted in descending order (a sorting network for small K)."""
    k = rows.shape[1]
    if k > 8:
        return -np.sort(-rows, axis=1)
    columns = [np.ascontiguousarray(rows[:, j]) for j in range(k)]
    for step in range(k):  # odd-even transposition sort
        for j in range(step % 2, k - 1, 2):
            columns[j], columns[j + 1] = (
                np.maximum(columns[j], columns[j + 1]),
                np.minimum(columns[j], columns[j + 1]),
            )
    return np.stack(columns, axis=1) if columns else rows.copy()


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


# Images per group in `count_masks` (label sets, band columns, then their pairs' runs).
_GROUP_IMAGES = 100


def chunk_label_sets(labels: LabelChunk, label_categories: np.ndarray) -> LabelSets:
    """Split a chunk's pixels into label sets, image by image.

    `labels.pixel` (n, P, sh, sw) int32 and `labels.image` (n, Q) int32 hold label
    numbers; `label_categories` (L + 1,) int32 is each label's category index, -1 for
    labels of no selected category (they are dropped).
    """
    groups = _LabelSetGroups(labels)
    for _ in groups:
        pass
    return groups.label_sets(label_categories)


@dataclass(frozen=True)
class _SetGroup:
    """The label sets of images [i0, i0 + n) of a chunk, numbered chunk-wide."""

    i0: int
    first_set: np.ndarray  # (n + 1,) int64
    pixel_set: np.ndarray  # (n, sh, sw) int16 or int32 set index minus first_set[0]


class _LabelSetGroups:
    """Iterate a chunk's label sets by groups of `_GROUP_IMAGES` images, then merge them.

    A group's sets are numbered chunk-wide, and its `pixel_set` holds them from the
    group's first; the sets' label rows are made canonical once, for the whole chunk.
    """

    def __init__(self, labels: LabelChunk) -> None:
        self.labels = labels
        self._pixel_set: list[tuple[int, np.ndarray]] = []
        self._raw: list[np.ndarray] = []
        self._pixel_count: list[np.ndarray] = []
        self._first_set: list[np.ndarray] = []
        self._n_sets = 0

    def __iter__(self) -> Iterator[_SetGroup]:
        for i0 in range(0, len(self.labels.pixel), _GROUP_IMAGES):
            i1 = min(i0 + _GROUP_IMAGES, len(self.labels.pixel))
            yield self._group(i0, i1)

    def _group(self, i0: int, i1: int) -> _SetGroup:
        pixel = self.labels.pixel[i0:i1]
        n, planes = pixel.shape[:2]
        size = pixel.shape[2] * pixel.shape[3]
        flat = pixel.reshape(n, planes, size)
        # Pixels are taken in runs of equal plane labels along each image's rows.
        start = np.zeros((n, size), dtype=bool)
        start[:, 0] = True
        change = np.empty((n, size - 1), dtype=bool)
        for p in range(planes):
            # The first plane's changes are written in place.
            np.not_equal(flat[:, p, 1:], flat[:, p, :-1], out=change if p else start[:, 1:])
            if p:
                start[:, 1:] |= change
        run_start = np.flatnonzero(start)
        image, at = np.divmod(run_start, size)
        at += image * (planes * size)
        # A run's set: its image (which fixes the image-level labels) and its plane labels.
        columns = [image, *(pixel.reshape(-1)[at + p * size] for p in range(planes))]
        distinct, run_set = _distinct_runs(columns)  # sorted by image first
        self._raw.append(
            np.concatenate([distinct[:, 1:], self.labels.image[i0:i1][distinct[:, 0]]], axis=1)
        )
        run_length = np.diff(run_start, append=n * size)
        self._pixel_count.append(
            np.bincount(run_set, weights=run_length, minlength=len(distinct)).astype(np.int64)
        )
        first_set = np.searchsorted(distinct[:, 0], np.arange(n + 1)) + self._n_sets
        self._first_set.append(first_set[:-1])
        # Set indices from the group's first: small enough for int16 in practice.
        local = np.int16 if len(distinct) <= np.iinfo(np.int16).max else np.int32
        pixel_set = np.repeat(run_set.astype(local), run_length).reshape(n, *pixel.shape[2:])
        self._pixel_set.append((self._n_sets, pixel_set))
        self._n_sets += len(distinct)
        return _SetGroup(i0, first_set, pixel_set)

    def label_sets(self, label_categories: np.ndarray) -> LabelSets:
        """The chunk's `LabelSets`, once every group was iterated."""
        width = self.labels.pixel.shape[1] + self.labels.image.shape[1]
        raw = np.concatenate(self._raw) if self._raw else np.zeros((0, width), np.int64)
        if raw.size and (raw.min() < 0 or raw.max() >= len(label_categories)):
            raise ValueError(
                f"label numbers must lie in [0, {len(label_categories) - 1}], "
                f"got [{raw.min()}, {raw.max()}]"
            )
        rows = canonical_rows(np.where(label_categories[raw] >= 0, raw, 0).astype(np.int32))
        bits = category_bits(rows, label_categories)
        first_set = np.concatenate([*self._first_set, [self._n_sets]]).astype(np.int64)
        n = len(self.labels.pixel)
        return LabelSets(
            rows=rows,
            pixel_count=(
                np.concatenate(self._pixel_count) if self._pixel_count else np.zeros(0, np.int64)
            ),
            category_bits=bits,
            first_set=first_set,
            pixel_set_parts=tuple(self._pixel_set) or (
                (0, np.zeros((0, *self.labels.pixel.shape[2:]), np.int32)),
            ),
            image_bits=(
                np.bitwise_or.reduceat(bits, first_set[:-1]) if n else np.zeros(0, np.uint64)
            ),
        )


def _distinct_runs(columns: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`unique_rows` of the rows with these columns (the first sorted, all non-negative).

    Each row is packed into the high bits of one integer and its index into the low
    bits, so a plain sort (no argsort) groups equal rows and still tells where each
    came from. Rows too wide to pack go to `unique_rows`.
    """
    n = len(columns[0])
    widths = [int(c.max(initial=0)).bit_length() for c in columns]
    index_bits = (n - 1).bit_length()
    if n == 0 or sum(widths) + index_bits > 63 or min(int(c.min()) for c in columns) < 0:
        return unique_rows(np.stack(columns, axis=1).astype(np.int64))
    packed = columns[0].astype(np.int64)
    for column, bits in zip(columns[1:], widths[1:], strict=True):
        packed <<= bits
        packed |= column
    packed <<= index_bits
    packed |= np.arange(n)
    packed.sort()
    row = packed & ((1 << index_bits) - 1)
    packed >>= index_bits
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(packed[1:], packed[:-1], out=new[1:])
    code = np.empty(n, dtype=np.int64)
    code[row] = np.cumsum(new) - 1
    first = row[new]
    return np.stack([c[first] for c in columns], axis=1).astype(np.int64), code


@dataclass(frozen=True)
class BandColumns:
    """The label sets down each band column of a group of images.

    Band b covers rows [band_start[b], band_start[b + 1]) of the images; rows are
    counted from the band's first. A band column holding one set has `split` equal
    to the band's length; two sets, `first` in its rows before `split` and `last`
    from there on; more, split == -1. Band columns are numbered (image, band, x) and
    cut into segments: runs of neighbours along x with the same three values.
    """

    first: np.ndarray  # (n·B·sw,) int32 set of the band's first row (as `pixel_set` has it)
    last: np.ndarray  # (n·B·sw,) int32 set of its last row
    split: np.ndarray  # (n·B·sw,) int32
    segment: np.ndarray  # (n·B·sw,) int64 segment of each band column
    segment_start: np.ndarray  # (S + 1,) int64 first band column of each segment, then the end


def band_columns(pixel_set: np.ndarray, band_start: np.ndarray) -> BandColumns:
    """The `BandColumns` of `pixel_set` (n, sh, sw) integer sets for bands from `band_start`."""
    sh, sw = pixel_set.shape[1:]
    stops = [*band_start[1:].tolist(), sh]
    first = pixel_set[:, band_start, :].astype(np.int32)
    last = pixel_set[:, np.array(stops) - 1, :].astype(np.int32)
    if max(y1 - y0 for y0, y1 in zip(band_start.tolist(), stops, strict=True)) > 255:
        split = _band_split_wide(pixel_set, band_start)  # uint8 row counts would overflow
    else:
        # Per band column: how many rows change set, and where when one does.
        changes = np.empty(first.shape, dtype=np.uint8)
        at = np.empty(first.shape, dtype=np.uint8)
        for b, (y0, y1) in enumerate(zip(band_start.tolist(), stops, strict=True)):
            change = (pixel_set[:, y0 + 1 : y1] != pixel_set[:, y0 : y1 - 1]).view(np.uint8)
            np.add.reduce(change, axis=1, dtype=np.uint8, out=changes[:, b])
            row = np.arange(1, y1 - y0, dtype=np.uint8)[:, None]
            np.add.reduce(change * row, axis=1, dtype=np.uint8, out=at[:, b])
        length = np.diff([*band_start.tolist(), sh]).astype(np.int32)[None, :, None]
        split = np.where(changes == 0, length, np.where(changes == 1, at.astype(np.int32), -1))
    return _band_segments(first.reshape(-1), last.reshape(-1), split.reshape(-1), sw)


def _band_segments(
    first: np.ndarray, last: np.ndarray, split: np.ndarray, sw: int
) -> BandColumns:
    """`BandColumns` of (n·B·sw,) int32 first, last and split: cut into segments."""
    new = np.ones(len(first), dtype=bool)
    if len(first):
        new[1:] = (first[1:] != first[:-1]) | (last[1:] != last[:-1]) | (split[1:] != split[:-1])
        new[::sw] = True
    start = np.flatnonzero(new)
    return BandColumns(
        first=first,
        last=last,
        split=split,
        segment=np.cumsum(new) - 1,
        segment_start=np.append(start, len(first)),
    )


def _band_split_wide(pixel_set: np.ndarray, band_start: np.ndarray) -> np.ndarray:
    """`band_columns`'s split for bands of any height."""
    n, sh, sw = pixel_set.shape
    stops = [*band_start[1:].tolist(), sh]
    split = np.empty((n, len(band_start), sw), dtype=np.int32)
    for b, (y0, y1) in enumerate(zip(band_start.tolist(), stops, strict=True)):
        change = pixel_set[:, y0 + 1 : y1] != pixel_set[:, y0 : y1 - 1]
        changes = change.sum(axis=1)
        at = np.argmax(change, axis=1) + 1
        split[:, b] = np.where(changes == 0, y1 - y0, np.where(changes == 1, at, -1))
    return split


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


@dataclass(frozen=True)
class DecodedLabels:
    """A chunk's label maps decoded for one row banding of the unit maps' resize.

    What `count_masks` needs of the labels, whatever the units: the chunk's label
    sets and, per group of `_GROUP_IMAGES` images, its pixels' sets and band columns
    (bands from `band_start`, `BilinearResize.rows.band_start` of the layer's grid).
    Computed once per chunk and grid (`decode_labels`), it serves every unit block.
    """

    i0: int  # global index of the chunk's first image
    sets: LabelSets
    band_start: np.ndarray  # (B,) int64
    groups: tuple[tuple[_SetGroup, BandColumns], ...]

    @property
    def mask_size(self) -> tuple[int, int]:
        """(sh, sw) of the label maps."""
        sh, sw = self.sets.pixel_set_parts[0][1].shape[1:]
        return int(sh), int(sw)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Named arrays that `from_arrays` reads back (per group `g{k}_...`)."""
        sets = self.sets
        arrays = {
            "rows": sets.rows, "pixel_count": sets.pixel_count,
            "category_bits": sets.category_bits, "first_set": sets.first_set,
            "image_bits": sets.image_bits, "band_start": self.band_start,
            "mask_size": np.array(self.mask_size, np.int64),
            "part_first": np.array([first for first, _ in sets.pixel_set_parts], np.int64),
        }
        for k, (group, columns) in enumerate(self.groups):
            arrays[f"g{k}_pixel_set"] = group.pixel_set
            for name in _COLUMN_ARRAYS:
                arrays[f"g{k}_{name}"] = _narrow(getattr(columns, name))
        return arrays

    @classmethod
    def from_arrays(cls, i0: int, arrays: dict[str, np.ndarray]) -> DecodedLabels:
        """Rebuild what `to_arrays` wrote for the chunk starting at image `i0`."""
        first_set = arrays["first_set"]
        parts, groups = [], []
        for k, part_first in enumerate(arrays["part_first"].tolist()):
            pixel_set = arrays[f"g{k}_pixel_set"]
            g0 = k * _GROUP_IMAGES
            group = _SetGroup(g0, first_set[g0 : g0 + len(pixel_set) + 1], pixel_set)
            parts.append((int(part_first), pixel_set))
            groups.append((group, BandColumns(**{n: arrays[f"g{k}_{n}"] for n in _COLUMN_ARRAYS})))
        if not parts:
            parts.append((0, np.zeros((0, *arrays["mask_size"].tolist()), np.int32)))
        sets = LabelSets(
            rows=arrays["rows"], pixel_count=arrays["pixel_count"],
            category_bits=arrays["category_bits"], first_set=first_set,
            image_bits=arrays["image_bits"], pixel_set_parts=tuple(parts),
        )
        return cls(i0, sets, arrays["band_start"], tuple(groups))


_COLUMN_ARRAYS = ("first", "last", "split", "segment", "segment_start")


def _narrow(values: np.ndarray) -> np.ndarray:
    """Integer `values` as int16 or int32 when they fit: band columns are stored small."""
    for small in (np.int16, np.int32):
        limits = np.iinfo(small)
        if values.size == 0 or (values.min() >= limits.min and values.max() <= limits.max):
            return values.astype(small)
    return values


def decode_labels(
    labels: LabelChunk, label_categories: np.ndarray, band_start: np.ndarray
) -> DecodedLabels:
    """Decode a chunk's label maps into label sets and band columns for `band_start`.

    `labels.pixel` (n, P, sh, sw) and `labels.image` (n, Q) int32 label numbers,
    `label_categories` (L + 1,) int32 category index of each label (-1: dropped).
    """
    groups = _LabelSetGroups(labels)
    decoded = tuple((group, band_columns(group.pixel_set, band_start)) for group in groups)
    return DecodedLabels(labels.i0, groups.label_sets(label_categories), band_start, decoded)


def count_masks(
    acts: np.ndarray, labels: LabelChunk, thresholds: np.ndarray, label_categories: np.ndarray
) -> MaskCounts:
    """`count_decoded` of `decode_labels(labels)` for the activations' grid.

    `acts` (n, U, h, w) float32 raw activations of images [labels.i0, labels.i1),
    `thresholds` (U,) float32 per unit, or (n, U) float32 per image and unit (the
    per-image percentiles of `per_image_iou`), `label_categories` (L + 1,) int32.
    """
    band_start = bilinear_resize(np.shape(acts)[2:], labels.pixel.shape[2:]).rows.band_start
    return count_decoded(acts, decode_labels(labels, label_categories, band_start), thresholds)


def count_decoded(
    acts: np.ndarray, labels: DecodedLabels, thresholds: np.ndarray
) -> MaskCounts:
    """Threshold a chunk's activations and count each pair's mask pixels per label set.

    `acts` (n, U, h, w) float32 raw activations of the chunk's images, `thresholds`
    (U,) or (n, U) float32 (as `count_masks`), `labels` the chunk decoded for the
    activations' grid.

    Image group by image group (`_GROUP_IMAGES`): the runs of the group's pairs, each
    counted at once when it lies in one label set, or in two with the split inside
    the run, and pixel by pixel otherwise.
    """
    acts = np.asarray(acts, dtype=np.float32)
    thresholds = np.asarray(thresholds, dtype=np.float32)
    n, n_units = acts.shape[:2]
    sets = labels.sets
    if len(sets.first_set) - 1 != n:
        raise ValueError(f"activations hold {n} images, label chunk {len(sets.first_set) - 1}")
    resize = bilinear_resize(acts.shape[2:], labels.mask_size)
    if not np.array_equal(resize.rows.band_start, labels.band_start):
        raise ValueError(f"the labels were decoded for another grid than {acts.shape[2:]}")
    raw_max = _spatial_max(acts)
    pair_image, pair_unit = np.nonzero(raw_max > thresholds)
    pair_threshold = np.broadcast_to(thresholds, raw_max.shape)[pair_image, pair_unit]
    flat_acts = acts.reshape(n * n_units, *acts.shape[2:])
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (pair, set, count)
    for group, columns in labels.groups:
        p0, p1 = np.searchsorted(pair_image, [group.i0, group.i0 + len(group.pixel_set)])
        image = pair_image[p0:p1] - group.i0
        # Bins of pair p: one per label set of its image, from base[p] on.
        image_sets = np.diff(group.first_set)[image]
        end = np.cumsum(image_sets)
        maps = np.take(flat_acts, pair_image[p0:p1] * n_units + pair_unit[p0:p1], axis=0)
        for pair, label_set, count in _count_group(
            resize, group, maps, pair_threshold[p0:p1], image, end - image_sets, end,
            columns,
        ):
            found.append((pair + p0, label_set, count))
    pair, label_set, count = (
        (np.concatenate(a) for a in zip(*found, strict=True)) if found
        else (np.zeros(0, np.int64) for _ in range(3))
    )
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


def _count_group(
    resize: BilinearResize,
    sets: _SetGroup,
    maps: np.ndarray,
    thresholds: np.ndarray,
    image: np.ndarray,
    base: np.ndarray,
    end: np.ndarray,
    columns: BandColumns,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Count the mask pixels of one image group's pairs per label set.

    Pair p (map `maps[p]` of group image `image[p]`) has bins base[p] .. end[p] - 1,
    bin base[p] + k for its image's k-th set. Yields (pair, set, count): the nonzero
    counts, by pair (index into `maps`), then set (chunk-wide index).
    """
    band_start = resize.rows.band_start
    n_bands, (sh, sw) = len(band_start), sets.pixel_set.shape[1:]
    first_set, last_set, split = columns.first, columns.last, columns.split  # group sets
    flat_sets = sets.pixel_set.reshape(-1)
    set0 = sets.first_set[0]
    # Per pair: its first band column, its bin of the group's first set.
    pair_column = image * (n_bands * sw)
    pair_bin = base - (sets.first_set[image] - set0)
    group: tuple[int, int] | None = None
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert group is not None
        q0, q1 = group
        sums = np.bincount(
            np.concatenate([k for k, _ in pending]),
            weights=np.concatenate([w for _, w in pending]),
            minlength=int(end[q1 - 1] - base[q0]),
        )
        pending.clear()
        found = np.flatnonzero(sums > 0)
        pair = np.repeat(np.arange(q0, q1), end[q0:q1] - base[q0:q1])[found]
        label_set = found - (base[pair] - base[q0]) + sets.first_set[image[pair]]
        return pair, label_set, np.rint(sums[found]).astype(np.int64)

    def count(bins: np.ndarray, at: np.ndarray, first: np.ndarray, stop: np.ndarray,
              width: np.ndarray | int) -> np.ndarray:
        """Add `width` columns' runs [first, stop) at band columns `at`; return the mixed."""
        where = split[at]
        # Rows before `middle` hold the column's first set, the others its last.
        middle = np.minimum(np.maximum(where, first), stop)
        before = np.subtract(middle, first, dtype=float)
        after = np.subtract(stop, middle, dtype=float)
        after *= where >= 0
        if not isinstance(width, int):
            before *= width
            after *= width
        pending.append((bins + first_set[at], before))
        pending.append((bins + last_set[at], after))
        return np.flatnonzero(where < 0)

    for runs in resize.column_runs(maps, thresholds):
        if runs.maps != group:
            if pending:
                yield flush()
            group = runs.maps
        tile_column = pair_column[runs.tile_map] + runs.tile_band * sw
        tile_bin = pair_bin[runs.tile_map] - base[group[0]]
        if isinstance(runs, TileRuns):
            # Band columns alike along x count at once, segment by segment.
            at = tile_column + runs.left
            segment = columns.segment[at]
            pieces = columns.segment[at + runs.count - 1] - segment + 1
            tile, segment = expand_ranges(np.arange(len(at)), segment, pieces)
            left = np.maximum(columns.segment_start[segment], at[tile])
            right = np.minimum(columns.segment_start[segment + 1], (at + runs.count)[tile])
            first, stop = runs.first[tile], runs.stop[tile]
            mixed = count(tile_bin[tile], left, first, stop, right - left)
            if len(mixed) == 0:
                continue
            # Segments whose set changes more than once, column by column.
            tile = tile[mixed]
            runs = TileRuns(runs.maps, runs.tile_map[tile], runs.tile_band[tile],
                            left[mixed] - tile_column[tile], (right - left)[mixed],
                            first[mixed], stop[mixed]).columns()
            tile_bin = tile_bin[tile]
            mixed = np.arange(len(runs.x))
        else:
            at = tile_column[runs.column_tile] + runs.x
            mixed = count(tile_bin[runs.column_tile], at, runs.first, runs.stop, 1)
        # Columns whose set changes more than once: pixel by pixel.
        if len(mixed):
            tile = runs.column_tile[mixed]
            first = band_start[runs.tile_band[tile]] + runs.first[mixed]
            length = runs.stop[mixed] - runs.first[mixed]
            # Pixel k of a column's run: set index at start + k·sw.
            start = (image[runs.tile_map[tile]] * sh + first) * sw + runs.x[mixed]
            run, row = expand_ranges(np.arange(len(length)), np.zeros_like(length), length)
            pixel = flat_sets[start[run] + row * sw]
            pending.append((tile_bin[tile][run] + pixel, np.ones(len(pixel))))
    if pending:
        yield flush()


def _spatial_max(acts: np.ndarray) -> np.ndarray:
    """(n, U) maximum of each (h, w) map of `acts` (n, U, h, w)."""
    n, n_units = acts.shape[:2]
    size = acts.shape[2] * acts.shape[3]
    if acts.size == 0:
        return acts.reshape(n, n_units, size).max(axis=2, initial=-np.inf)
    # One reduction over the flat array runs faster than n·U short ones.
    starts = np.arange(0, acts.size, size)
    return np.maximum.reduceat(acts.reshape(-1), starts).reshape(n, n_units)
