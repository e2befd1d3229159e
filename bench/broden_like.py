"""Broden-like synthetic probe data and NetDissect-Lite's tally loop, shared by the benches.

Synthetic probe set at Broden scale per image: 112×112 label maps with an object,
a part and a colour plane plus image-level scene and texture labels (about 20
labels per image, 1,241 in all, Zipf-distributed), and a ResNet-18 layer4-like
layer: 512 units at 7×7, each tuned to one label (its share of every cell, times a
gain, plus noise, rectified).

`baseline_tally` is NetDissect-Lite's `tally_job` inner loop (per image, per unit: a
raw-max check, PIL bilinear resize, threshold, argwhere and bincount per label), the
reference the NetDissect benches compare with.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from services.common.probe_format import LabelChunk

UNITS = 512
CHUNK = 200
RAW, MASK = 7, 112

# Label numbers by category, 1-based and contiguous.
SIZES = {"object": 584, "part": 234, "color": 11, "scene": 365, "texture": 47}
CATEGORIES = list(SIZES)
FIRST = dict(zip(SIZES, np.cumsum([1, *SIZES.values()])[:-1].tolist(), strict=True))


def label_categories() -> np.ndarray:
    """(L + 1,) int32 category index of every label (-1 for 0)."""
    return np.array([-1] + [c for c, n in enumerate(SIZES.values()) for _ in range(n)], np.int32)


def _zipf(rng: np.random.Generator, n: int, size: tuple[int, ...] | int) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** 1.1
    return rng.choice(n, size=size, p=p / p.sum())


def _voronoi(rng: np.random.Generator, n: int, seeds: int) -> np.ndarray:
    """(n, 112, 112) index of the nearest of `seeds` random points, drawn at 56×56."""
    half = MASK // 2
    ys, xs = rng.uniform(0, half, (2, n, seeds, 1, 1))
    yy, xx = np.mgrid[0:half, 0:half]
    nearest = ((yy - ys) ** 2 + (xx - xs) ** 2).argmin(axis=1)
    return nearest.repeat(2, axis=1).repeat(2, axis=2)


def synthetic_labels(seed: int, n: int) -> LabelChunk:
    """Label maps of n images: pixel (n, 3, 112, 112) int32, image (n, 2) int32."""
    rng = np.random.default_rng(seed)
    region = _voronoi(rng, n, 12)
    objects = FIRST["object"] + _zipf(rng, SIZES["object"], (n, 12))
    obj = np.take_along_axis(objects, region.reshape(n, -1), 1).reshape(region.shape)
    # Parts: the upper or lower share of five objects.
    cut = rng.integers(20, 92, (n, 5, 1, 1))
    rows = np.arange(MASK)[None, None, :, None]
    half = np.where(rng.random((n, 5, 1, 1)) < 0.5, rows < cut, rows >= cut)
    inside = (region[:, None] == np.arange(5)[None, :, None, None]) & half
    parts = FIRST["part"] + _zipf(rng, SIZES["part"], (n, 5))
    part = (inside * parts[:, :, None, None]).max(axis=1)
    colours = FIRST["color"] + rng.integers(0, SIZES["color"], (n, 6))
    colours[:, 5] = 0
    colour_region = _voronoi(rng, n, 6)
    colour = np.take_along_axis(colours, colour_region.reshape(n, -1), 1).reshape(region.shape)
    image = np.zeros((n, 2), np.int32)
    image[:, 0] = FIRST["scene"] + _zipf(rng, SIZES["scene"], n)
    textured = rng.random(n) < 0.3
    image[textured, 1] = FIRST["texture"] + rng.integers(0, SIZES["texture"], textured.sum())
    return LabelChunk(0, np.stack([obj, part, colour], axis=1).astype(np.int32), image)


def unit_preferences(seed: int, units: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unit: preferred plane (U,), preferred label (U,), gain (U,) float32."""
    rng = np.random.default_rng(seed)
    plane = rng.choice([0, 0, 0, 1, 2], units)
    label = np.select(
        [plane == 0, plane == 1],
        [
            FIRST["object"] + _zipf(rng, SIZES["object"], units),
            FIRST["part"] + _zipf(rng, SIZES["part"], units),
        ],
        FIRST["color"] + rng.integers(0, SIZES["color"], units),
    )
    return plane, label, rng.uniform(1.5, 3.0, units).astype(np.float32)


def synthetic_acts(seed: int, labels: LabelChunk, units: int = UNITS) -> np.ndarray:
    """(n, U, 7, 7) float32: gain · share of the unit's label in each cell + noise, rectified."""
    rng = np.random.default_rng(seed)
    plane, label, gain = unit_preferences(0, units)
    n = len(labels.pixel)
    n_labels = len(label_categories())
    cells = (np.arange(MASK) // (MASK // RAW))[:, None] * RAW + np.arange(MASK) // (MASK // RAW)
    acts = np.empty((n, units, RAW * RAW), np.float32)
    for p in range(labels.pixel.shape[1]):
        key = (np.arange(n)[:, None, None] * RAW * RAW + cells) * n_labels + labels.pixel[:, p]
        counts = np.bincount(key.ravel(), minlength=n * RAW * RAW * n_labels)
        share = counts.reshape(n, RAW * RAW, n_labels) / (MASK // RAW) ** 2
        mine = plane == p
        acts[:, mine] = share[:, :, label[mine]].transpose(0, 2, 1) * gain[mine, None]
    acts += rng.normal(0, 0.35, acts.shape).astype(np.float32)
    return np.maximum(acts, 0).reshape(n, units, RAW, RAW)


def baseline_tally(
    acts: np.ndarray, labels: LabelChunk, thresholds: np.ndarray, categories: np.ndarray
) -> dict[str, np.ndarray]:
    """NetDissect-Lite's tally loop (feature_operation.py `tally_job`), labels in memory."""
    n_labels, n_categories = len(categories), int(categories.max()) + 1
    labelcat = np.zeros((n_labels, n_categories))
    labelcat[np.arange(1, n_labels), categories[1:]] = 1
    tally_both = np.zeros((acts.shape[1], n_labels), np.int64)
    tally_labels = np.zeros(n_labels, np.int64)
    tally_units = np.zeros(acts.shape[1], np.int64)
    tally_units_cat = np.zeros((acts.shape[1], n_categories), np.int64)
    sh, sw = labels.pixel.shape[2:]
    for i in range(len(acts)):
        pixels = labels.pixel[i]
        scalars = [int(s) for s in labels.image[i] if s > 0]
        for scalar in scalars:
            tally_labels[scalar] += sh * sw
        tally_label = np.bincount(pixels.ravel())
        tally_label[0] = 0
        tally_labels[: len(tally_label)] += tally_label
        for unit_id in range(acts.shape[1]):
            feature_map = acts[i, unit_id]
            if feature_map.max() > thresholds[unit_id]:
                image = Image.fromarray(feature_map)
                mask = np.asarray(image.resize((sw, sh), Image.Resampling.BILINEAR))
                indexes = np.argwhere(mask > thresholds[unit_id])
                tally_units[unit_id] += len(indexes)
                tally_bt = np.bincount(pixels[:, indexes[:, 0], indexes[:, 1]].ravel())
                if len(tally_bt) > 0:
                    tally_bt[0] = 0
                tally_cat = np.dot(tally_bt[None, :], labelcat[: len(tally_bt), :])[0]
                tally_both[unit_id, : len(tally_bt)] += tally_bt
                for scalar in scalars:
                    tally_cat += labelcat[scalar]
                    tally_both[unit_id, scalar] += len(indexes)
                tally_units_cat[unit_id] += len(indexes) * (tally_cat > 0)
    tally_both[:, 0] = 0
    tally_labels[0] = 0
    return {
        "intersection": tally_both,
        "label_area": tally_labels,
        "mask_area": tally_units,
        "mask_area_lite": tally_units_cat,
    }
