"""Threshold sensitivity of Network Dissection's labels, from cached activations.

Follows specs/verification.md (reference: inner-detectors' `activ_thres.py`): the
labelling is re-run with the threshold swept over a list, with no forward pass —
dataset-wide top quantiles (`quantile_sweep`: T_u at each quantile, `netdissect.IoUTally`
under the job's `iou_mode`) or, in the per_image mode, per-image percentiles
(`percentile_sweep`, `per_image_iou.PerImageTally`). Each decoded label chunk is read
once and counted by every threshold's tally.

Per layer (`sweep_points`): for every threshold, the detectors, their unique labels
and the fraction of units whose label equals their label at the job's own threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.common.probe_format import ConceptTable
from services.common.spec_vocabulary import DatasetIoUMode
from services.explainer import netdissect, per_image_iou
from services.explainer.unit_masks import DecodedLabels, count_decoded


@dataclass(frozen=True)
class SweepLabel:
    """A unit's best label at one threshold of the sweep."""

    threshold: float  # the quantile or the per-image percentile
    label: int
    iou: float
    detector: bool


def quantile_sweep(
    acts_chunks: Callable[[], Iterable[np.ndarray]],
    labelled_chunks: Iterable[tuple[np.ndarray, DecodedLabels]],
    quantiles: Sequence[float],
    concepts: ConceptTable,
    iou_mode: DatasetIoUMode,
    detector_iou: float,
) -> list[list[SweepLabel]]:
    """Per unit of a block, its best label at each top quantile (in `quantiles` order).

    `acts_chunks()` yields the block's (n, U, h, w) chunks as stored (called once per
    quantile for float16 ones, twice for float32, for the exact thresholds);
    `labelled_chunks` yields them once more with their labels decoded for the layer's grid.
    """
    label_categories = concepts.label_categories()
    tallies = [
        netdissect.IoUTally(
            netdissect.unit_thresholds(acts_chunks, q), label_categories,
            len(concepts.categories), top_k=1,
        )
        for q in quantiles
    ]
    for acts, labels in labelled_chunks:
        for tally in tallies:
            tally.add(count_decoded(acts, labels, tally.thresholds))
    found = [
        netdissect.dissect(tally.result(), concepts, iou_mode, detector_iou) for tally in tallies
    ]
    return _by_unit(quantiles, [[(d.best, d.detector) for d in ds] for ds in found])


def percentile_sweep(
    labelled_chunks: Iterable[tuple[np.ndarray, DecodedLabels]],
    percentiles: Sequence[float],
    concepts: ConceptTable,
    detector_iou: float,
) -> list[list[SweepLabel]]:
    """Per unit of a block, its best per_image label at each percentile, in one pass."""
    label_categories = concepts.label_categories()
    tallies: list[per_image_iou.PerImageTally] = []
    for acts, labels in labelled_chunks:
        if not tallies:
            tallies = [
                per_image_iou.PerImageTally(acts.shape[1], label_categories, p, top_k=1)
                for p in percentiles
            ]
        for tally in tallies:
            tally.update(acts, labels)
    found = [
        per_image_iou.dissect_per_image(tally.result(), concepts, detector_iou)
        for tally in tallies
    ]
    return _by_unit(
        percentiles,
        [[(d.dissection.best, d.dissection.detector) for d in ds] for ds in found],
    )


def _by_unit(
    thresholds: Sequence[float], found: list[list[tuple[netdissect.LabelMatch, bool]]]
) -> list[list[SweepLabel]]:
    """Transpose per-threshold answers into per-unit sweeps."""
    return [
        [
            SweepLabel(float(t), best.label, best.iou, detector)
            for t, (best, detector) in zip(thresholds, answers, strict=True)
        ]
        for answers in zip(*found, strict=True)
    ]


@dataclass(frozen=True)
class SweepPoint:
    """One threshold's figures for a layer (proto `SweepPoint`)."""

    threshold: float
    detectors: int
    unique_labels: int
    unchanged_fraction: float  # of units, label equal to their label at the job's threshold


def sweep_points(
    thresholds: Sequence[float],
    labels: Mapping[int, Sequence[tuple[str, bool]]],
    default_labels: Mapping[int, str],
) -> list[SweepPoint]:
    """The layer's figures at each threshold.

    `labels[u][k]` is unit u's (label name, detector) at `thresholds[k]`;
    `default_labels[u]` its NetDissect label at the job's own threshold.
    """
    units = sorted(labels)
    points = []
    for k, threshold in enumerate(thresholds):
        detected = [labels[u][k][0] for u in units if labels[u][k][1]]
        same = sum(labels[u][k][0] == default_labels.get(u) for u in units)
        points.append(SweepPoint(
            threshold=float(threshold),
            detectors=len(detected),
            unique_labels=len(set(detected)),
            unchanged_fraction=same / len(units) if units else 0.0,
        ))
    return points
