"""Network Dissection: per-unit thresholds, dataset-level concept IoU, detectors, tally.csv.

Follows specs/netdissect.md (reference: NetDissect-Lite, Bau et al. 2017).

1. `unit_thresholds` — T_u, the exact quantile at 1 - top_quantile of unit u's raw
   activations over all N·h·w positions (numpy's default linear interpolation),
   streamed over image chunks with memory bounded by the unit block: once for
   float16 activations (a histogram of all 2**16 values is exact), twice otherwise.
2. `IoUTally` — streamed over image chunks: M_u = bilinear_resize(raw_u) > T_u
   (PIL BILINEAR), intersections with every label, label areas, mask areas for the
   three `iou_mode` denominators, and each unit's top images by raw spatial max.
   (image, unit) pairs whose raw max is at or below T_u have empty masks and are
   skipped without changing any count.
3. `dissect` / `tally_csv` — IoU(u, c) = Σ|M_u ∩ L_c| /
   (Σ'|M_u| + Σ|L_c| - Σ|M_u ∩ L_c|), best label per category and overall,
   detectors (best IoU >= 0.04) and NetDissect-Lite's tally.csv (the layer's counts of
   detectors are the method's summary, `methods/netdissect.layer_summary`).

`iou_mode` picks Σ'|M_u| for a label c of primary category k: `all` sums the mask
over every image; `netdissect` over images whose ground truth holds any label of k;
`lite` over images where a label of k lies inside the unit's mask or is an
image-level label of the image (NetDissect-Lite's `tally_units_cat`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.common.probe_format import ConceptTable, LabelChunk
from services.common.spec_vocabulary import (
    DATASET_IOU_MODES,
    DETECTOR_IOU,
    NETDISSECT_EXEMPLARS,
    TOP_QUANTILE,
    DatasetIoUMode,
)
from services.explainer.unit_masks import MaskCounts, count_masks

# Pass 1 of the threshold selection counts keys by their top bits: 2**16 bins per unit.
_PREFIX_SHIFT = 16
_PREFIX_BINS = 1 << (32 - _PREFIX_SHIFT)
_SIGN = np.uint32(0x80000000)
_HALF_SIGN = np.uint16(0x8000)
_HALF_VALUES = 1 << 16
# Order keys of float16 NaNs: negative ones sort first, positive ones last.
_HALF_NAN_BELOW, _HALF_NAN_ABOVE = 0x03FF, 0xFC01


def _order_keys(values: np.ndarray) -> np.ndarray:
    """Map float32 values to uint32 keys that sort in the same order."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def _from_order_keys(keys: np.ndarray) -> np.ndarray:
    """Invert `_order_keys`: uint32 keys → float32 values."""
    keys = keys.astype(np.uint32)
    return np.where(keys & _SIGN, keys & ~_SIGN, ~keys).view(np.float32)


def _quantile_ranks(n: int, q: float) -> tuple[int, int, float]:
    """0-based ranks of the two order statistics numpy interpolates, and the second's weight."""
    if n == 0:
        raise ValueError("no activations were counted")
    q_ = np.asarray(q, dtype=np.float64)
    virtual = n * q_ + (1 + q_ * (1 - 1 - 1)) - 1  # numpy's _compute_virtual_index
    if virtual >= n - 1:
        return n - 1, n - 1, float(virtual - np.floor(virtual))
    first = int(np.floor(virtual))
    return first, first + 1, float(virtual - first)


def _lerp(low: np.ndarray, high: np.ndarray, gamma: float) -> np.ndarray:
    """Interpolate as numpy's `_lerp` with a Python-float weight, in float32: (U,) float32."""
    diff = high - low
    if gamma >= 0.5:
        return high - diff * (1 - gamma)
    return low + diff * gamma


class _CountedQuantile:
    """What both quantile selectors keep: the quantile and per-unit counts of key bins."""

    def __init__(self, n_units: int, top_quantile: float, bins: int) -> None:
        if not 0.0 < top_quantile < 1.0:
            raise ValueError(f"top_quantile must lie in (0, 1), got {top_quantile}")
        self.n_units = n_units
        self.q = 1.0 - float(top_quantile)
        self._hist = np.zeros((n_units, bins), dtype=np.int64)
        self._n = 0


class HalfQuantile(_CountedQuantile):
    """Exact per-unit quantile of float16 activations in one pass over the chunks.

    A float16 value has 2**16 bit patterns, so a histogram of every unit's values by
    an order-preserving 16-bit key holds the whole sorted distribution: the order
    statistics are read from its cumulative counts, converted to float32 exactly and
    interpolated as `UnitQuantile` does, so thresholds equal `np.quantile` of the
    values in float32 bit for bit. Memory is 2**16 counts per unit.
    """

    def __init__(self, n_units: int, top_quantile: float = TOP_QUANTILE.default) -> None:
        super().__init__(n_units, top_quantile, _HALF_VALUES)

    def count(self, acts: np.ndarray) -> None:
        """Add a chunk, (n, U, h, w) float16 activations."""
        if acts.dtype != np.float16 or acts.ndim != 4 or acts.shape[1] != self.n_units:
            raise ValueError(
                f"expected (n, {self.n_units}, h, w) float16 activations, "
                f"got {acts.shape} {acts.dtype}")
        bits = np.ascontiguousarray(acts).view(np.uint16)
        keys = np.where(bits & _HALF_SIGN, ~bits, bits | _HALF_SIGN)
        for u in range(self.n_units):
            self._hist[u] += np.bincount(keys[:, u].reshape(-1), minlength=_HALF_VALUES)
        self._n += acts.shape[0] * acts.shape[2] * acts.shape[3]

    def thresholds(self) -> np.ndarray:
        """Return the (U,) float32 quantiles."""
        if self._hist[:, :_HALF_NAN_BELOW].any() or self._hist[:, _HALF_NAN_ABOVE:].any():
            raise ValueError("activations hold NaN")
        first, second, gamma = _quantile_ranks(self._n, self.q)
        cumulative = np.cumsum(self._hist, axis=1)
        keys = np.stack([(cumulative <= first).sum(axis=1), (cumulative <= second).sum(axis=1)])
        keys = keys.astype(np.uint16)
        bits = np.where(keys & _HALF_SIGN, keys & ~_HALF_SIGN, ~keys)
        low, high = bits.view(np.float16).astype(np.float32)
        return _lerp(low, high, gamma)


class UnitQuantile(_CountedQuantile):
    """Exact per-unit quantile of activations streamed in two passes over the chunks.

    Pass 1 (`count`) histograms every value of each unit by the top 16 bits of an
    order-preserving key, which brackets the two order statistics around the
    quantile's rank. Pass 2 (`collect`) keeps only the values inside the bracket, as
    distinct keys with counts, and selects the order statistics exactly. Memory is
    2**16 counts per unit plus the bracket's distinct values (at most 2**17 per
    unit), whatever the number of images.

    The quantile is numpy's default (`method="linear"`): with n values sorted
    ascending, v = q·(n - 1) computed as numpy does, and the result interpolates the
    order statistics floor(v) and floor(v) + 1 in float32 exactly like
    `np.quantile(values, q)` with a Python float q, so thresholds equal it bit for bit.
    """

    def __init__(self, n_units: int, top_quantile: float = TOP_QUANTILE.default) -> None:
        super().__init__(n_units, top_quantile, _PREFIX_BINS)
        # Per unit: first and last prefix bin of the bracket, values below it, values in it.
        self._bracket: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._found: list[tuple[np.ndarray, np.ndarray]] = []
        self._found_size = 0
        self._compacted_size = 0

    def count(self, acts: np.ndarray) -> None:
        """Pass 1: add a chunk, (n, U, h, w) float32 activations."""
        if self._bracket is not None:
            raise RuntimeError("count() after collect(): pass 1 is over")
        keys = self._keys(acts)
        prefix = (keys >> np.uint32(_PREFIX_SHIFT)).astype(np.int64)
        for u in range(self.n_units):
            self._hist[u] += np.bincount(prefix[:, u].reshape(-1), minlength=_PREFIX_BINS)
        self._n += keys.shape[0] * keys.shape[2]

    def collect(self, acts: np.ndarray) -> None:
        """Pass 2: add the same chunks again, in any order."""
        if self._bracket is None:
            self._bracket = self._find_bracket()
        low = self._bracket[0].astype(np.uint32) << np.uint32(_PREFIX_SHIFT)
        span = ((self._bracket[1] + 1).astype(np.uint64) << np.uint64(_PREFIX_SHIFT)) - 1 - low
        keys = self._keys(acts)
        # One unsigned comparison tests low <= key <= high (smaller keys wrap around).
        inside = keys - low[None, :, None] <= span.astype(np.uint32)[None, :, None]
        unit = np.nonzero(inside)[1].astype(np.uint64)
        combined = (unit << np.uint64(32)) | keys[inside].astype(np.uint64)
        self._add_found(*np.unique(combined, return_counts=True))

    def thresholds(self) -> np.ndarray:
        """Return the (U,) float32 quantiles, after both passes."""
        if self._bracket is None:
            self._bracket = self._find_bracket()
        keys, counts = self._compact()
        below = self._bracket[2]
        first, second, gamma = self._ranks()
        unit = (keys >> np.uint64(32)).astype(np.int64)
        seen = np.bincount(unit, weights=counts, minlength=self.n_units)
        if np.any(seen != self._bracket[3]):
            raise RuntimeError("pass 2 (collect) did not see the values of pass 1 (count)")
        cumulative = np.cumsum(counts)
        start = np.searchsorted(unit, np.arange(self.n_units))
        base = np.where(start > 0, cumulative[np.maximum(start - 1, 0)], 0)
        lo_at = np.searchsorted(cumulative, base + first - below, side="right")
        hi_at = np.searchsorted(cumulative, base + second - below, side="right")
        low = _from_order_keys(keys[lo_at] & np.uint64(0xFFFFFFFF))
        high = _from_order_keys(keys[hi_at] & np.uint64(0xFFFFFFFF))
        return _lerp(low, high, gamma)

    def _keys(self, acts: np.ndarray) -> np.ndarray:
        acts = np.asarray(acts, dtype=np.float32)
        if acts.ndim != 4 or acts.shape[1] != self.n_units:
            raise ValueError(f"expected (n, {self.n_units}, h, w) activations, got {acts.shape}")
        if np.isnan(acts).any():
            raise ValueError("activations hold NaN")
        return _order_keys(acts).reshape(acts.shape[0], self.n_units, -1)

    def _ranks(self) -> tuple[int, int, float]:
        return _quantile_ranks(self._n, self.q)

    def _find_bracket(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per unit: the prefix bins holding both order statistics and the counts around."""
        first, second, _ = self._ranks()
        cumulative = np.cumsum(self._hist, axis=1)
        low = (cumulative <= first).sum(axis=1)
        high = (cumulative <= second).sum(axis=1)
        units = np.arange(self.n_units)
        below = np.where(low > 0, cumulative[units, np.maximum(low - 1, 0)], 0)
        return low.astype(np.uint32), high.astype(np.uint32), below, cumulative[units, high] - below

    def _add_found(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self._found.append((keys, counts.astype(np.int64)))
        self._found_size += len(keys)
        if self._found_size > max(1 << 20, 2 * self._compacted_size):
            self._found = [self._compact()]
            self._compacted_size = self._found_size = len(self._found[0][0])

    def _compact(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._found:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        keys = np.concatenate([k for k, _ in self._found])
        counts = np.concatenate([c for _, c in self._found])
        distinct, where = np.unique(keys, return_inverse=True)
        return distinct, np.bincount(where, weights=counts).astype(np.int64)


def unit_thresholds(
    chunks: Callable[[], Iterable[np.ndarray]], top_quantile: float = TOP_QUANTILE.default
) -> np.ndarray:
    """Return (U,) float32 T_u: the exact quantile at 1 - top_quantile of each unit.

    `chunks()` must yield the same (n, U, h, w) activation chunks each time it is
    called, all float16 or none; it is called once for float16 chunks (`HalfQuantile`),
    twice otherwise (`UnitQuantile`'s two streaming passes).
    """
    selector: HalfQuantile | UnitQuantile | None = None
    for acts in chunks():
        if selector is None:
            kind = HalfQuantile if acts.dtype == np.float16 else UnitQuantile
            selector = kind(np.shape(acts)[1], top_quantile)
        selector.count(acts)
    if selector is None:
        raise ValueError("no activation chunks")
    if isinstance(selector, UnitQuantile):
        for acts in chunks():
            selector.collect(acts)
    return selector.thresholds()


@dataclass(frozen=True)
class TallyCounts:
    """Everything IoU needs for a block of units, independent of `iou_mode`.

    Counts are in pixels at mask resolution, summed over the probe set. Index 0 of
    the label axis is "no label" and stays 0.
    """

    first_unit: int  # global index of the block's first unit
    n_images: int
    thresholds: np.ndarray  # (U,) float32
    intersection: np.ndarray  # (U, L + 1) int64 Σ|M_u ∩ L_c|
    label_area: np.ndarray  # (L + 1,) int64 Σ|L_c|
    mask_area: np.ndarray  # (U,) int64 Σ|M_u| over all images (mode `all`)
    mask_area_lite: np.ndarray  # (U, C) int64 Σ|M_u| where category c is inside the mask
    mask_area_netdissect: np.ndarray  # (U, C) int64 Σ|M_u| where category c is in the image
    top_images: np.ndarray  # (U, k) int64 images with the largest raw maxima, best first
    top_values: np.ndarray  # (U, k) float32 their raw maxima


class IoUTally:
    """Stream image chunks of one unit block into `TallyCounts`.

    `thresholds` (U,) float32 are the block's T_u; `label_categories` (L + 1,) int32
    the category index of each label (`ConceptTable.label_categories()`, -1 for
    labels of no selected category, which are ignored).
    """

    def __init__(
        self,
        thresholds: np.ndarray,
        label_categories: np.ndarray,
        n_categories: int,
        first_unit: int = 0,
        top_k: int = NETDISSECT_EXEMPLARS.default,
    ) -> None:
        if n_categories > 64:
            raise ValueError(f"at most 64 categories are supported, got {n_categories}")
        if np.max(label_categories, initial=-1) >= n_categories:
            raise ValueError(f"label_categories holds categories beyond {n_categories - 1}")
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self.label_categories = np.asarray(label_categories, dtype=np.int32)
        self.first_unit = first_unit
        self.top_k = top_k
        n_units, n_labels = len(self.thresholds), len(self.label_categories)
        self._n_images = 0
        self._intersection = np.zeros((n_units, n_labels), dtype=np.int64)
        self._label_area = np.zeros(n_labels, dtype=np.int64)
        self._mask_area = np.zeros(n_units, dtype=np.int64)
        self._lite = np.zeros((n_units, n_categories), dtype=np.int64)
        self._netdissect = np.zeros((n_units, n_categories), dtype=np.int64)
        self._top = np.zeros((n_units, 0), dtype=np.uint64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # intersections not yet counted
        self._pending_size = 0

    def update(self, acts: np.ndarray, labels: LabelChunk) -> None:
        """Add one chunk: (n, U, h, w) float32 activations of images [labels.i0, labels.i1)."""
        self.add(count_masks(acts, labels, self.thresholds, self.label_categories))

    def add(self, counts: MaskCounts) -> None:
        """Add one chunk already thresholded by `count_masks` with these thresholds."""
        n_units, n_labels = self._intersection.shape
        rows = counts.sets.rows
        width = rows.shape[1]
        # Intersections wait in a buffer, counted at once when it holds as many
        # entries as the table has cells (so memory stays that of the unit block, and
        # the table is swept once per many chunks); padding columns land on label 0,
        # which is dropped.
        at = (counts.pair_unit[counts.pair] * n_labels)[:, None] + rows[counts.set]
        self._pending.append((at.reshape(-1), np.repeat(counts.count, width)))
        self._pending_size += at.size
        if self._pending_size >= self._intersection.size:
            self._count_pending()
        self._label_area += _weighted_count(
            rows.reshape(-1), np.repeat(counts.sets.pixel_count, width), n_labels
        )
        self._mask_area += _weighted_count(counts.pair_unit, counts.pair_area, n_units)
        area = counts.pair_area.astype(np.float64)
        image_bits = counts.sets.image_bits[counts.pair_image]
        for c in range(self._lite.shape[1]):
            bit = np.uint64(c)
            for table, bits in ((self._lite, counts.pair_bits), (self._netdissect, image_bits)):
                weights = ((bits >> bit) & np.uint64(1)).astype(np.float64)
                weights *= area
                table[:, c] += _weighted_count(counts.pair_unit, weights, n_units)
        self._add_top(counts.i0, counts.raw_max)
        self._n_images += len(counts.raw_max)

    def _count_pending(self) -> None:
        """Add the buffered intersections to the table."""
        if self._pending:
            at = np.concatenate([a for a, _ in self._pending])
            weights = np.concatenate([w for _, w in self._pending])
            self._intersection += _weighted_count(
                at, weights, self._intersection.size
            ).reshape(self._intersection.shape)
        self._pending.clear()
        self._pending_size = 0

    def result(self) -> TallyCounts:
        """Return the counts so far."""
        self._count_pending()
        intersection = self._intersection.copy()
        intersection[:, 0] = 0
        label_area = self._label_area.copy()
        label_area[0] = 0
        return TallyCounts(
            first_unit=self.first_unit,
            n_images=self._n_images,
            thresholds=self.thresholds.copy(),
            intersection=intersection,
            label_area=label_area,
            mask_area=self._mask_area.copy(),
            mask_area_lite=self._lite.copy(),
            mask_area_netdissect=self._netdissect.copy(),
            top_images=(self._top & np.uint64(0xFFFFFFFF)).astype(np.int64),
            top_values=_from_order_keys(~(self._top >> np.uint64(32))),
        )

    def _add_top(self, i0: int, raw_max: np.ndarray) -> None:
        """Keep each unit's top_k images by raw max; ties go to the lower image index.

        Keys pack the inverted order key of the value above the image index, so the
        smallest keys are the best images.
        """
        images = np.arange(i0, i0 + len(raw_max), dtype=np.uint64)
        units = np.arange(raw_max.shape[1])
        if self._top.shape[1] == self.top_k:
            # Only units with an image at least as good as their k-th can change.
            kth = _from_order_keys(~(self._top[:, -1] >> np.uint64(32)))
            units = np.flatnonzero((raw_max >= kth).any(axis=0))
            if len(units) == 0:
                return
        value_key = (~_order_keys(raw_max[:, units].T)).astype(np.uint64)
        keys = np.concatenate(
            [self._top[units], (value_key << np.uint64(32)) | images[None, :]], axis=1
        )
        keep = min(self.top_k, keys.shape[1])
        if keep < keys.shape[1]:
            keys = np.partition(keys, keep - 1, axis=1)[:, :keep]
        if self._top.shape[1] == keep:
            self._top[units] = np.sort(keys, axis=1)
        else:
            self._top = np.sort(keys, axis=1)


def _weighted_count(index: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """(size,) int64 sums of integer `weights` per `index` (exact below 2**53)."""
    return np.rint(np.bincount(index, weights=weights, minlength=size)).astype(np.int64)


def iou(
    counts: TallyCounts, label_categories: np.ndarray, mode: DatasetIoUMode = "lite"
) -> np.ndarray:
    """(U, L + 1) float64 IoU of every unit with every label under `mode`.

    Labels of no selected category, and label 0, score 0.
    """
    return _scores(counts, np.asarray(label_categories), mode)[0]


def _scores(
    counts: TallyCounts, label_categories: np.ndarray, mode: DatasetIoUMode
) -> tuple[np.ndarray, np.ndarray]:
    """Return ((U, L + 1) IoU, (U, L + 1) int64 mask area Σ'|M_u| used for each label)."""
    if mode not in DATASET_IOU_MODES:
        raise ValueError(
            f"iou_mode must be one of {', '.join(DATASET_IOU_MODES)}, got {mode!r}"
            " (per_image: `per_image_iou`)"
        )
    category = label_categories.clip(0)
    if mode == "all":
        area = np.broadcast_to(counts.mask_area[:, None], counts.intersection.shape)
    elif mode == "lite":
        area = counts.mask_area_lite[:, category]
    else:
        area = counts.mask_area_netdissect[:, category]
    union = area + counts.label_area[None, :] - counts.intersection
    valid = (label_categories >= 0)[None, :] & (union > 0)
    valid[:, 0] = False
    scores = np.where(valid, counts.intersection / np.maximum(union, 1), 0.0)
    return scores, np.asarray(area)


@dataclass(frozen=True)
class LabelMatch:
    """One label's IoU with one unit and the counts behind it."""

    label: int
    iou: float
    intersection: int  # Σ|M_u ∩ L_c|
    label_area: int  # Σ|L_c| ("truth")
    mask_area: int  # Σ'|M_u| under the IoU mode ("activation")


@dataclass(frozen=True)
class UnitDissection:
    """Network Dissection's answer for one unit."""

    unit: int  # global unit index
    threshold: float
    best: LabelMatch  # the best label over all categories
    category: str  # the best label's primary category
    detector: bool  # best IoU >= the detector threshold
    per_category: dict[str, LabelMatch]  # the best label of each category that has labels
    exemplars: tuple[int, ...]  # top images by raw spatial max, best first


def dissect(
    counts: TallyCounts,
    concepts: ConceptTable,
    iou_mode: DatasetIoUMode = "lite",
    detector_iou: float = DETECTOR_IOU.default,
) -> list[UnitDissection]:
    """Pick each unit's best label per category and overall (ties: lowest label number)."""
    label_categories = concepts.label_categories()
    scores, area = _scores(counts, label_categories, iou_mode)

    def best_of(labels: np.ndarray) -> np.ndarray:
        return labels[np.argmax(scores[:, labels], axis=1)]

    per_category = {
        name: best_of(np.flatnonzero(label_categories == c))
        for c, name in enumerate(concepts.categories)
        if np.any(label_categories == c)
    }
    selected = np.flatnonzero(label_categories >= 0)
    selected = selected[selected > 0]
    if len(selected) == 0:
        raise ValueError("the concept table has no label in a selected category")
    best = best_of(selected)

    def match(u: int, label: int) -> LabelMatch:
        return LabelMatch(
            label=int(label),
            iou=float(scores[u, label]),
            intersection=int(counts.intersection[u, label]),
            label_area=int(counts.label_area[label]),
            mask_area=int(area[u, label]),
        )

    return [
        UnitDissection(
            unit=counts.first_unit + int(u),
            threshold=float(counts.thresholds[u]),
            best=match(u, best[u]),
            category=concepts.categories[label_categories[best[u]]],
            detector=bool(scores[u, best[u]] >= detector_iou),
            per_category={name: match(u, labels[u]) for name, labels in per_category.items()},
            exemplars=tuple(int(i) for i in counts.top_images[u]),
        )
        for u in range(len(scores))
    ]


def tally_csv(dissections: Sequence[UnitDissection], concepts: ConceptTable) -> str:
    """Return NetDissect-Lite's tally.csv for these units, rows by score descending.

    Columns: `unit` (1-based), `category`, `label`, `score`, then for each category
    `{cat}-label,{cat}-truth,{cat}-activation,{cat}-intersect,{cat}-iou`.
    """
    names = concepts.label_names()
    header = ["unit", "category", "label", "score"]
    for cat in concepts.categories:
        header += [f"{cat}-label", f"{cat}-truth", f"{cat}-activation", f"{cat}-intersect",
                   f"{cat}-iou"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for d in sorted(dissections, key=lambda d: (-d.best.iou, d.unit)):
        row: list[object] = [d.unit + 1, d.category, names[d.best.label], d.best.iou]
        for cat in concepts.categories:
            m = d.per_category.get(cat)
            row += ["", "", "", "", ""] if m is None else [
                names[m.label], m.label_area, m.mask_area, m.intersection, m.iou
            ]
        writer.writerow(row)
    return out.getvalue()
