"""Unit masks' fast paths against dense references: column runs, band columns, counts.

`BilinearResize.column_runs` must hold exactly the pixels of the dense resize above
each threshold (values sitting on the cut, ties, signed zeros and flat maps
included), and `count_masks` exactly the dense masks' pixels per label set, with
label maps fine enough that band columns hold one, two or more sets.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.common.probe_format import LabelChunk
from services.explainer import unit_masks, upsample
from services.explainer.unit_masks import (
    _distinct_runs,
    _sort_descending,
    band_columns,
    chunk_label_sets,
    count_masks,
    unique_rows,
)
from services.explainer.upsample import BilinearResize, ColumnRuns, TileRuns

SIZES = [
    ((7, 7), (112, 112)),
    ((14, 14), (112, 112)),
    ((13, 9), (112, 100)),
    ((3, 5), (7, 11)),
    ((2, 3), (9, 10)),
    ((7, 7), (7, 6)),  # two taps, not consecutive
    ((5, 4), (5, 4)),
    ((28, 20), (7, 8)),  # downsampling: the general method
    ((1, 3), (16, 12)),  # one tap: the general method
]


def hard_maps(rng: np.random.Generator, m: int, size: tuple[int, int]) -> np.ndarray:
    """(m, h, w) float32 maps with the cases that make crossings hard."""
    maps = (rng.standard_normal((m, *size)) * 2).astype(np.float32)
    quarter = m // 4
    maps[:quarter] = np.round(maps[:quarter])  # ties and flat stretches
    maps[quarter : 2 * quarter] = np.where(rng.random((quarter, *size)) < 0.5, 0.0, -0.0)
    maps[quarter : 2 * quarter, 0] += 1.0
    maps[2 * quarter] = 3.0  # one flat map
    maps[2 * quarter + 1] *= np.float32(1e-30)  # tiny values
    maps[2 * quarter + 2] *= np.float32(1e30)  # huge values
    # Neighbouring taps one float32 apart.
    maps[2 * quarter + 3] = np.nextafter(np.float32(1.0), np.float32(2.0)) * (
        rng.random(size) < 0.5
    ) + np.float32(1.0) * (rng.random(size) >= 0.5)
    return maps.astype(np.float32)


def hard_thresholds(
    rng: np.random.Generator, maps: np.ndarray, dense: np.ndarray
) -> np.ndarray:
    """Per map: a quantile, or exactly a pixel's value, or exactly a tap's value."""
    m = len(maps)
    thresholds = np.array(
        [np.quantile(maps[i], q) for i, q in enumerate(rng.uniform(0.3, 1.0, m))], np.float32
    )
    flat = dense.reshape(m, -1)
    pick = rng.integers(0, flat.shape[1], m)
    thresholds[::3] = flat[np.arange(m), pick][::3]  # on a pixel's value
    thresholds[1::5] = maps.reshape(m, -1)[np.arange(m), pick % maps[0].size][1::5]
    thresholds[2 * (m // 4) + 3] = 1.0
    return thresholds


def run_pixels(runs: ColumnRuns | TileRuns, resize: BilinearResize) -> np.ndarray:
    """Flat indices (map, row, column) of every pixel of the runs, repeats kept."""
    if isinstance(runs, TileRuns):
        runs = runs.columns()
    sh, sw = resize.out_size
    length = runs.stop - runs.first
    assert np.all(length >= 0)
    tile = np.repeat(runs.column_tile, length)
    offset = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    y = resize.rows.band_start[runs.tile_band[tile]] + np.repeat(runs.first, length) + offset
    band_stop = np.append(resize.rows.band_start[1:], sh)[runs.tile_band[tile]]
    assert np.all(y < band_stop)  # runs stay inside their band
    return (runs.tile_map[tile] * sh + y) * sw + np.repeat(runs.x, length)


@pytest.mark.parametrize(("in_size", "out_size"), SIZES)
def test_column_runs_hold_exactly_the_pixels_above(
    in_size: tuple[int, int], out_size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upsample, "_GROUP_MAPS", 9)  # several groups
    rng = np.random.default_rng(11)
    resize = BilinearResize(in_size, out_size)
    maps = hard_maps(rng, 40, in_size)
    dense = resize(maps)
    thresholds = hard_thresholds(rng, maps, dense)
    found = np.concatenate(
        [run_pixels(runs, resize) for runs in resize.column_runs(maps, thresholds)]
    )
    expected = np.flatnonzero((dense > thresholds[:, None, None]).ravel())
    assert len(found) == len(np.unique(found))  # no pixel twice
    np.testing.assert_array_equal(np.sort(found), expected)


def test_upsampling_takes_the_fast_path() -> None:
    for in_size, out_size in SIZES[:5]:
        resize = BilinearResize(in_size, out_size)
        assert resize._search is not None
        rows, cols = resize._search
        assert rows.consecutive and cols.consecutive
    for in_size, out_size in SIZES[-2:]:
        assert BilinearResize(in_size, out_size)._search is None


def fine_labels(
    rng: np.random.Generator, n: int, size: int, n_labels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label maps where band columns hold one, two or many sets; union cases included."""
    label_categories = np.full(n_labels + 1, -1, np.int32)
    label_categories[1:] = rng.choice([0, 1, 2], n_labels)
    label_categories[rng.choice(np.arange(1, n_labels + 1), 3, replace=False)] = -1
    block = rng.integers(1, n_labels + 1, (n, 3, size // 4, size // 4))
    pixel = np.kron(block, np.ones((1, 1, 4, 4), np.int64))
    noise = rng.random(pixel.shape) < 0.05  # single odd pixels
    pixel = np.where(noise, rng.integers(0, n_labels + 1, pixel.shape), pixel)
    pixel[:, 2, : size // 2] = 0  # an empty stretch
    pixel[0, 1] = pixel[0, 0]  # the same label in two planes
    image = np.zeros((n, 2), np.int32)
    image[:, 0] = rng.integers(0, n_labels + 1, n)
    image[1, 1] = pixel[1, 0, 0, 0]  # a pixel label also image-level
    return pixel.astype(np.int32), image, label_categories


def dense_counts(
    acts: np.ndarray, labels: LabelChunk, thresholds: np.ndarray, label_categories: np.ndarray
) -> dict[tuple[int, int], int]:
    """(pair, set) → pixels, from dense masks and the sets of every pixel."""
    n, n_units = acts.shape[:2]
    resize = BilinearResize(acts.shape[2:], labels.pixel.shape[2:])
    pixel_set = chunk_label_sets(labels, label_categories).pixel_set
    masks = resize(acts.reshape(n * n_units, *acts.shape[2:])).reshape(
        n, n_units, *labels.pixel.shape[2:]
    ) > thresholds[None, :, None, None]
    fires = acts.reshape(n, n_units, -1).max(axis=2) > thresholds
    out = {}
    for pair, (i, u) in enumerate(zip(*np.nonzero(fires), strict=True)):
        counts = np.bincount(pixel_set[i][masks[i, u]])
        for label_set in np.flatnonzero(counts):
            out[pair, int(label_set)] = int(counts[label_set])
    assert not masks[~fires].any()  # skipped pairs have empty masks
    return out


@pytest.mark.parametrize(("size", "n_units"), [(28, 17), (112, 6)])
def test_count_masks_equals_dense_masks_per_label_set(
    size: int, n_units: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unit_masks, "_GROUP_IMAGES", 4)
    monkeypatch.setattr(upsample, "_GROUP_MAPS", 5)
    rng = np.random.default_rng(12)
    pixel, image, label_categories = fine_labels(rng, 11, size, 30)
    labels = LabelChunk(40, pixel, image)
    acts = np.maximum(rng.standard_normal((11, n_units, 7, 7)), 0).astype(np.float32)
    acts[:, 0] = np.round(acts[:, 0])  # ties
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(n_units, -1), 0.9, axis=1)
    thresholds = thresholds.astype(np.float32)
    counts = count_masks(acts, labels, thresholds, label_categories)
    got = {
        (int(p), int(s)): int(c)
        for p, s, c in zip(counts.pair, counts.set, counts.count, strict=True)
    }
    assert got == dense_counts(acts, labels, thresholds, label_categories)
    assert np.all(np.diff(counts.pair) >= 0)
    np.testing.assert_array_equal(counts.raw_max, acts.max(axis=(2, 3)))
    np.testing.assert_array_equal(
        counts.pair_area, np.bincount(counts.pair, counts.count, len(counts.pair_image))
    )
    sets = chunk_label_sets(labels, label_categories)
    for name in ("rows", "pixel_count", "category_bits", "first_set", "pixel_set", "image_bits"):
        np.testing.assert_array_equal(getattr(counts.sets, name), getattr(sets, name))


@pytest.mark.parametrize("tall", [False, True])
def test_band_columns_describe_each_band_column(tall: bool) -> None:
    rng = np.random.default_rng(13)
    height = 600 if tall else 40
    pixel_set = np.repeat(rng.integers(0, 4, (3, height // 2, 9)), 2, axis=1).astype(np.int16)
    pixel_set[:, 5:9] = 7  # uniform stretches
    pixel_set[:, 300:] = 5
    pixel_set[:, 450:, 4] = 6
    band_start = np.array([0, 299, 570]) if tall else np.array([0, 3, 7, 15, 16])
    columns = band_columns(pixel_set, band_start)
    stops = [*band_start[1:], height]
    k = 0
    for i in range(3):
        for y0, y1 in zip(band_start, stops, strict=True):
            for x in range(9):
                column = pixel_set[i, y0:y1, x]
                changes = np.flatnonzero(column[1:] != column[:-1]) + 1
                assert columns.first[k] == column[0] and columns.last[k] == column[-1]
                split = {0: y1 - y0, 1: changes[0] if len(changes) else 0}.get(len(changes), -1)
                assert columns.split[k] == split
                k += 1
    # Segments: runs of alike neighbours along x, never across a band row.
    segment, start = columns.segment, columns.segment_start
    assert start[0] == 0 and start[-1] == len(segment)
    np.testing.assert_array_equal(segment[start[:-1]], np.arange(len(start) - 1))
    assert np.all(np.isin(np.arange(0, len(segment), 9), start))
    alike = (np.diff(columns.first) == 0) & (np.diff(columns.last) == 0)
    alike &= np.diff(columns.split) == 0
    alike[8::9] = False
    np.testing.assert_array_equal(np.diff(segment) == 0, alike)


def test_distinct_runs_equal_unique_rows() -> None:
    rng = np.random.default_rng(14)
    image = np.sort(rng.integers(0, 9, 500))
    planes = [rng.integers(0, 5, 500) for _ in range(3)]
    for columns in ([image, *planes], [image, planes[0] << 40, planes[1] << 30, planes[2]]):
        distinct, code = _distinct_runs(columns)
        expected, expected_code = unique_rows(np.stack(columns, axis=1))
        np.testing.assert_array_equal(distinct, expected)
        np.testing.assert_array_equal(code, expected_code)


def test_small_sorts_sort_descending() -> None:
    rng = np.random.default_rng(15)
    for k in range(11):
        rows = rng.integers(0, 6, (300, k)).astype(np.int32)
        np.testing.assert_array_equal(_sort_descending(rows), -np.sort(-rows, axis=1))


@pytest.mark.parametrize(("in_size", "out_size"), SIZES[:4])
def test_column_runs_skip_nan_values(
    in_size: tuple[int, int], out_size: tuple[int, int]
) -> None:
    rng = np.random.default_rng(16)
    resize = BilinearResize(in_size, out_size)
    maps = rng.standard_normal((30, *in_size)).astype(np.float32)
    maps[::3, 1, 1] = np.nan
    maps[1::4, 0, :] = np.nan
    thresholds = np.full(30, 0.3, np.float32)
    with np.errstate(invalid="ignore"):
        expected = np.flatnonzero((resize(maps) > thresholds[:, None, None]).ravel())
    found = [run_pixels(runs, resize) for runs in resize.column_runs(maps, thresholds)]
    np.testing.assert_array_equal(np.sort(np.concatenate(found)), expected)
