"""Per-image thresholds and the mean of per-image IoUs: inner-detectors' Network Dissection.

Follows specs/verification.md (reference: TreeLLi/inner-detectors), the `per_image`
`iou_mode` of Network Dissection:

1. `image_thresholds` — each image's own threshold per unit: the percentile p
   (default 50, the median; numpy's linear interpolation) of its **raw** map. The
   upsampled map is thresholded strictly above it (`>`), so an all-zero map gives
   an empty mask, never a full one.
2. `PerImageTally` — streamed over image chunks: M_u(x) = bilinear_resize(raw_u(x))
   > t_u(x) (PIL BILINEAR, `unit_masks.count_decoded` with per-image thresholds, on
   the chunk's decoded labels), and
   for every image x holding label c, IoU(M_u(x), L_c(x)). An image-level label's
   L_c(x) is the whole image.
3. `dissect_per_image` — mIoU(u, c) = Σ_{x ∋ c} IoU(M_u(x), L_c(x)) / #{x ∋ c}: the
   count-weighted mean over annotation instances and images. Broden has no instances,
   so a concept's whole mask in an image is its one instance, and only images that
   hold the concept count (an empty mask there scores 0). Best label per category
   and overall, detectors (best mIoU >= the detector IoU) and the top concepts
   (at most `TOP_CONCEPTS` with mIoU >= `TOP_CONCEPT_IOU`, best first).

The pixel counts behind each mIoU (Σ|L_c|, Σ|M_u| and Σ|M_u ∩ L_c| over the images
holding c) are kept for NetDissect-Lite's tally.csv columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.common.probe_format import ConceptTable
from services.common.spec_vocabulary import (
    DETECTOR_IOU,
    IMAGE_PERCENTILE,
    NETDISSECT_EXEMPLARS,
    TOP_CONCEPT_IOU,
    TOP_CONCEPTS,
)
from services.explainer.netdissect import LabelMatch, UnitDissection
from services.explainer.unit_masks import DecodedLabels, count_decoded


def image_thresholds(acts: np.ndarray, percentile: float = IMAGE_PERCENTILE.default) -> np.ndarray:
    """(n, U) float32: the `percentile` of each raw map of `acts` (n, U, h, w)."""
    acts = np.asarray(acts, dtype=np.float32)
    n, n_units = acts.shape[:2]
    return np.percentile(acts.reshape(n, n_units, -1), percentile, axis=2).astype(np.float32)


@dataclass(frozen=True)
class PerImageCounts:
    """Sums over the images holding each label, for a block of units.

    Index 0 of the label axis is "no label" and stays 0; labels of no selected
    category are never counted.
    """

    first_unit: int  # global index of the block's first unit
    n_images: int
    iou_sum: np.ndarray  # (U, L + 1) float64 Σ_{x ∋ c} IoU(M_u(x), L_c(x))
    images: np.ndarray  # (L + 1,) int64 #{x ∋ c}
    intersection: np.ndarray  # (U, L + 1) int64 Σ_{x ∋ c} |M_u(x) ∩ L_c(x)|
    label_area: np.ndarray  # (L + 1,) int64 Σ_x |L_c(x)|
    mask_area: np.ndarray  # (U, L + 1) int64 Σ_{x ∋ c} |M_u(x)|
    top_images: np.ndarray  # (U, k) int64 images with the largest raw maxima, best first

    def mean_iou(self) -> np.ndarray:
        """(U, L + 1) float64 mIoU(u, c); 0 for labels held by no image."""
        return np.where(self.images > 0, self.iou_sum / np.maximum(self.images, 1), 0.0)


class PerImageTally:
    """Stream image chunks of one unit block into `PerImageCounts`.

    `label_categories` (L + 1,) int32 is the category index of each label
    (`ConceptTable.label_categories()`, -1 for labels of no selected category).
    """

    def __init__(
        self,
        n_units: int,
        label_categories: np.ndarray,
        percentile: float = IMAGE_PERCENTILE.default,
        first_unit: int = 0,
        top_k: int = NETDISSECT_EXEMPLARS.default,
    ) -> None:
        self.label_categories = np.asarray(label_categories, dtype=np.int32)
        self.percentile = percentile
        self.first_unit = first_unit
        self.top_k = top_k
        width = len(self.label_categories)
        self._n_images = 0
        self._iou_sum = np.zeros((n_units, width), dtype=np.float64)
        self._images = np.zeros(width, dtype=np.int64)
        self._intersection = np.zeros((n_units, width), dtype=np.int64)
        self._label_area = np.zeros(width, dtype=np.int64)
        self._mask_area = np.zeros((n_units, width), dtype=np.int64)
        self._top_values = np.zeros((n_units, 0), dtype=np.float32)
        self._top_images = np.zeros((n_units, 0), dtype=np.int64)

    def update(self, acts: np.ndarray, labels: DecodedLabels) -> None:
        """Add one chunk: (n, U, h, w) float32 activations of the images of `labels`.

        `labels` were decoded with the same `label_categories`.
        """
        acts = np.asarray(acts, dtype=np.float32)
        n, n_units = acts.shape[:2]
        width = len(self.label_categories)
        counts = count_decoded(acts, labels, image_thresholds(acts, self.percentile))
        sets = counts.sets
        # (n, L + 1) pixels of each label in each image (rows are padded with label 0).
        set_image = np.repeat(np.arange(n), np.diff(sets.first_set))
        k = sets.rows.shape[1]
        area = np.bincount(
            (set_image[:, None] * width + sets.rows).reshape(-1),
            weights=np.repeat(sets.pixel_count, k).astype(np.float64),
            minlength=n * width,
        ).reshape(n, width)
        area[:, 0] = 0
        present = area > 0
        mask = np.zeros((n, n_units), dtype=np.float64)
        mask[counts.pair_image, counts.pair_unit] = counts.pair_area
        self._mask_area += np.rint(mask.T @ present).astype(np.int64)
        self._label_area += np.rint(area.sum(axis=0)).astype(np.int64)
        self._images += present.sum(axis=0)
        # Σ|M ∩ L_c| of every (pair, label) with a nonzero intersection.
        keys = (counts.pair[:, None] * width + sets.rows[counts.set]).reshape(-1)
        weights = np.repeat(counts.count, k)
        keep = keys % width != 0
        pair_label, where = np.unique(keys[keep], return_inverse=True)
        inter = np.bincount(where, weights=weights[keep].astype(np.float64))
        pair, label = np.divmod(pair_label, width)
        image, unit = counts.pair_image[pair], counts.pair_unit[pair]
        union = counts.pair_area[pair] + area[image, label] - inter
        at = unit * width + label
        self._iou_sum += np.bincount(
            at, weights=inter / union, minlength=n_units * width
        ).reshape(n_units, width)
        self._intersection += np.rint(
            np.bincount(at, weights=inter, minlength=n_units * width)
        ).astype(np.int64).reshape(n_units, width)
        self._add_top(labels.i0, counts.raw_max)
        self._n_images += n

    def _add_top(self, i0: int, raw_max: np.ndarray) -> None:
        """Keep each unit's top_k images by raw max (n, U); ties go to the lower image."""
        chunk_images = np.broadcast_to(np.arange(i0, i0 + len(raw_max)), raw_max.T.shape)
        values = np.concatenate([self._top_values, raw_max.T], axis=1)
        images = np.concatenate([self._top_images, chunk_images], axis=1)
        order = np.lexsort((images, -values), axis=1)[:, : self.top_k]
        self._top_values = np.take_along_axis(values, order, axis=1)
        self._top_images = np.take_along_axis(images, order, axis=1)

    def result(self) -> PerImageCounts:
        """Return the sums so far."""
        return PerImageCounts(
            first_unit=self.first_unit,
            n_images=self._n_images,
            iou_sum=self._iou_sum.copy(),
            images=self._images.copy(),
            intersection=self._intersection.copy(),
            label_area=self._label_area.copy(),
            mask_area=self._mask_area.copy(),
            top_images=self._top_images.copy(),
        )


@dataclass(frozen=True)
class PerImageDissection:
    """Network Dissection's per_image answer for one unit: the dissection and its top concepts."""

    dissection: UnitDissection  # `threshold` is NaN: every image has its own
    top_concepts: tuple[LabelMatch, ...]  # mIoU >= TOP_CONCEPT_IOU, best first


def dissect_per_image(
    counts: PerImageCounts,
    concepts: ConceptTable,
    detector_iou: float = DETECTOR_IOU.default,
) -> list[PerImageDissection]:
    """Each unit's best label per category and overall by mIoU (ties: lowest label number)."""
    label_categories = concepts.label_categories()
    scores = counts.mean_iou()
    selected = np.flatnonzero((label_categories >= 0) & (counts.images > 0))
    selected = selected[selected > 0]
    if len(selected) == 0:
        raise ValueError("no image holds a label of a selected category")

    def best_of(labels: np.ndarray) -> np.ndarray:
        return labels[np.argmax(scores[:, labels], axis=1)]

    per_category = {
        name: best_of(labels)
        for c, name in enumerate(concepts.categories)
        if len(labels := selected[label_categories[selected] == c])
    }
    best = best_of(selected)

    def match(u: int, label: int) -> LabelMatch:
        return LabelMatch(
            label=int(label),
            iou=float(scores[u, label]),
            intersection=int(counts.intersection[u, label]),
            label_area=int(counts.label_area[label]),
            mask_area=int(counts.mask_area[u, label]),
        )

    out = []
    for u in range(len(scores)):
        ranked = selected[np.lexsort((selected, -scores[u, selected]))]
        top = [label for label in ranked[:TOP_CONCEPTS] if scores[u, label] >= TOP_CONCEPT_IOU]
        dissection = UnitDissection(
            unit=counts.first_unit + u,
            threshold=math.nan,
            best=match(u, best[u]),
            category=concepts.categories[label_categories[best[u]]],
            detector=bool(scores[u, best[u]] >= detector_iou),
            per_category={name: match(u, labels[u]) for name, labels in per_category.items()},
            exemplars=tuple(int(i) for i in counts.top_images[u]),
        )
        out.append(PerImageDissection(dissection, tuple(match(u, label) for label in top)))
    return out
