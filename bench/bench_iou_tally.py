"""Network Dissection's IoU tally: ours vs a NetDissect-Lite-style loop, same input.

Synthetic probe set at Broden scale per image: 112×112 label maps with an object,
a part and a colour plane plus image-level scene and texture labels (about 20
labels per image, 1,241 in all, Zipf-distributed), and a ResNet-18 layer4-like
layer: 512 units at 7×7, each tuned to one label (its share of every cell, times a
gain, plus noise, rectified).

Both sides get the same thresholds (ours, exact) and label maps in memory and must
produce identical counts (intersections, label areas, mask areas, lite mask areas).
The baseline is NetDissect-Lite's `tally_job` inner loop: per image, per unit, a
raw-max check, PIL bilinear resize, threshold, argwhere and bincount per label. It
runs on the first images only and its rate is extrapolated. The two sides alternate
over a few rounds and each rate is the median of its rounds. Ours is timed over every
`update` and the final `result()` (which adds the intersections it buffers). Times
are CPU seconds of this process (the machine is shared); neither side uses torch,
and BLAS only in the baseline's tiny per-unit `np.dot`, at OpenBLAS's defaults.
"""

from __future__ import annotations

import functools
import statistics
import time
import tracemalloc
from collections.abc import Iterator

import numpy as np
from PIL import Image

from services.common.probe_format import LabelChunk
from services.explainer.netdissect import IoUTally, TallyCounts, unit_thresholds

IMAGES = 2000
BASELINE_IMAGES = 150
ROUNDS = 3
CHUNK = 200
UNITS = 512
BLOCK = 64  # units of one Ray block task, for the memory figure
BRODEN_IMAGES = 63305
RAW, MASK = 7, 112
TARGET = 50.0

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


def _tally(
    acts: np.ndarray, chunks: list[LabelChunk], thresholds: np.ndarray
) -> tuple[TallyCounts, float]:
    """Our tally over the chunks; returns it and its CPU seconds (updates and result)."""
    tally = IoUTally(thresholds, label_categories(), len(CATEGORIES))
    spent = 0.0
    for chunk in chunks:
        started = time.process_time()
        tally.update(acts[chunk.i0 : chunk.i1], chunk)
        spent += time.process_time() - started
    started = time.process_time()
    counts = tally.result()
    return counts, spent + time.process_time() - started


def _block_chunks(acts: np.ndarray, u0: int) -> Iterator[np.ndarray]:
    """The activation chunks of units [u0, u0 + BLOCK), as a block task reads them."""
    for i0 in range(0, len(acts), CHUNK):
        yield acts[i0 : i0 + CHUNK, u0 : u0 + BLOCK]


def _chunks(first: int, last: int) -> list[LabelChunk]:
    out = []
    for i0 in range(first, last, CHUNK):
        chunk = synthetic_labels(i0, min(CHUNK, last - i0))
        out.append(LabelChunk(i0, chunk.pixel, chunk.image))
    return out


def _block_task_peak_mib(acts: np.ndarray, chunks: list[LabelChunk]) -> float:
    """Peak memory allocated by one block task (thresholds + tally for BLOCK units)."""
    tracemalloc.start()
    try:
        thresholds = unit_thresholds(functools.partial(_block_chunks, acts, 0))
        tally = IoUTally(thresholds, label_categories(), len(CATEGORIES))
        for chunk in chunks:
            tally.update(acts[chunk.i0 : chunk.i1, :BLOCK], chunk)
        tally.result()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def run() -> list[dict[str, object]]:
    acts = np.concatenate(
        [
            synthetic_acts(i0, synthetic_labels(i0, min(CHUNK, IMAGES - i0)))
            for i0 in range(0, IMAGES, CHUNK)
        ]
    )
    started = time.process_time()
    thresholds = np.concatenate(
        [  # one Ray block task after another
            unit_thresholds(functools.partial(_block_chunks, acts, u0))
            for u0 in range(0, UNITS, BLOCK)
        ]
    )
    threshold_rate = IMAGES / (time.process_time() - started)
    chunks = _chunks(0, IMAGES)
    _tally(acts[:CHUNK], chunks[:1], thresholds)  # warm-up: caches and allocator
    sample = _chunks(0, BASELINE_IMAGES)[0]
    # Rounds alternate the two sides, so a change of the machine's load hits both; each
    # side's rate is its median over the rounds.
    ours_rates, baseline_rates = [], []
    for _ in range(ROUNDS):
        started = time.process_time()
        expected = baseline_tally(acts[:BASELINE_IMAGES], sample, thresholds, label_categories())
        baseline_rates.append(BASELINE_IMAGES / (time.process_time() - started))
        counts, spent = _tally(acts, chunks, thresholds)
        ours_rates.append(IMAGES / spent)
    ours, baseline = statistics.median(ours_rates), statistics.median(baseline_rates)
    check, _ = _tally(acts[:BASELINE_IMAGES], [sample], thresholds)
    for name, value in expected.items():
        if not np.array_equal(getattr(check, name), value):
            raise AssertionError(f"tally differs from the baseline in {name}")

    firing = float((acts.max(axis=(2, 3)) > thresholds).mean())
    labels_per_image = np.mean(
        [
            len(set(np.unique(c.pixel[i])) | set(c.image[i])) - 1
            for c in chunks[:1]
            for i in range(50)
        ]
    )
    block_chunks = chunks[:3]
    peak = _block_task_peak_mib(acts[: block_chunks[-1].i1], block_chunks)
    chunk_mib = acts[:CHUNK, :BLOCK].nbytes + chunks[0].pixel.nbytes + chunks[0].image.nbytes
    print(
        f"iou_tally: ours {ours:.0f} images/s, baseline {baseline:.1f} images/s "
        f"({BASELINE_IMAGES} images, extrapolated), thresholds {threshold_rate:.0f} images/s"
    )
    print(
        f"projected Broden ({BRODEN_IMAGES} images), ResNet-18 layer4 ({UNITS} units), one "
        f"core: tally {BRODEN_IMAGES / ours / 60:.1f} min (+ thresholds "
        f"{BRODEN_IMAGES / threshold_rate / 60:.1f} min), baseline "
        f"{BRODEN_IMAGES / baseline / 60:.1f} min"
    )
    print(
        f"one block task ({BLOCK} units, chunks of {CHUNK} images): peak {peak:.0f} MiB "
        f"allocated, plus its input chunk {chunk_mib / 2**20:.0f} MiB"
    )
    print(
        f"firing (image, unit) pairs {firing:.1%}, labels per image {labels_per_image:.1f}, "
        f"mean mask pixels per image {counts.mask_area.sum() / IMAGES:.0f}"
    )
    return [
        {
            "name": "iou_tally",
            "ours": ours,
            "baseline": baseline,
            "unit": "images/s",
            "ratio": ours / baseline,
            "target": TARGET,
            "notes": (
                f"512 units 7x7 -> 112x112, {len(label_categories()) - 1} labels, "
                f"{labels_per_image:.0f}/image, {firing:.0%} of pairs fire; CPU time; baseline "
                f"(NetDissect-Lite loop with PIL) on {BASELINE_IMAGES} images, extrapolated; "
                f"medians of {ROUNDS} alternating rounds (ours {_rates(ours_rates)}, baseline "
                f"{_rates(baseline_rates)} images/s); "
                f"identical counts asserted; Broden projection: ours "
                f"{BRODEN_IMAGES / ours / 60:.1f} min, baseline "
                f"{BRODEN_IMAGES / baseline / 60:.0f} min; block task peak {peak:.0f} MiB"
            ),
        }
    ]


def _rates(rates: list[float]) -> str:
    return "/".join(f"{r:.0f}" for r in rates)


if __name__ == "__main__":
    for record in run():
        print(record)
