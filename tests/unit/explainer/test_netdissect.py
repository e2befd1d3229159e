"""Network Dissection: thresholds, PIL-exact masks, IoU tally, dissection and tally.csv.

Fixtures are small synthetic probe sets built here with numpy: label maps at mask
resolution (pixel planes and image-level labels) and activations at a coarser
resolution, some planted from downsampled label masks.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from services.common.probe_format import Concept, ConceptTable, LabelChunk
from services.common.result_store import message_row
from services.explainer import unit_masks, upsample
from services.explainer.methods.netdissect import layer_summary, result_message
from services.explainer.netdissect import (
    IoUTally,
    TallyCounts,
    dissect,
    iou,
    tally_csv,
    unit_thresholds,
)
from services.explainer.unit_masks import chunk_label_sets
from services.explainer.upsample import BilinearResize, _monotone_runs, resize_axis

CATEGORIES = ["object", "part", "scene", "color"]


def make_concepts(label_categories: np.ndarray) -> ConceptTable:
    labels = [
        Concept(number=int(n), name=f"c{n}", category=CATEGORIES[c])
        for n, c in enumerate(label_categories)
        if n > 0 and c >= 0
    ]
    return ConceptTable(
        dataset_key="test",
        categories=CATEGORIES,
        labels=labels,
        n_images=0,
        image_size=(0, 0),
        mask_size=(0, 0),
        chunk_size=0,
        plane_categories=[],
    )


def random_probe(
    rng: np.random.Generator, n: int, size: int, cell: int, n_labels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label maps made of cell×cell blocks: (n, 3, size, size) pixel planes, (n, 2) image labels.

    Labels 1..n_labels; categories cycle object/part/color for pixel labels, scene
    for image-level ones; some labels get no selected category (-1).
    """
    label_categories = np.full(n_labels + 1, -1, dtype=np.int32)
    label_categories[1:] = rng.choice([0, 1, 3], n_labels)
    scene = rng.choice(np.arange(1, n_labels + 1), 6, replace=False)
    label_categories[scene] = 2
    label_categories[rng.choice(np.arange(1, n_labels + 1), 2, replace=False)] = -1
    grid = size // cell
    planes = []
    for p in range(3):
        blocks = rng.integers(1, n_labels + 1, (n, grid, grid))
        blocks[rng.random((n, grid, grid)) < 0.3 * p] = 0
        planes.append(np.kron(blocks, np.ones((1, cell, cell), dtype=np.int64)))
    pixel = np.stack(planes, axis=1).astype(np.int32)
    # Union semantics: the same label in two planes, and as pixel and image label.
    pixel[0, 1, :cell, :cell] = pixel[0, 0, :cell, :cell]
    image = np.zeros((n, 2), dtype=np.int32)
    image[:, 0] = rng.choice(scene, n)
    image[1, 1] = pixel[1, 0, 0, 0]
    return pixel, image, label_categories


def brute_force_tally(
    acts: np.ndarray,
    pixel: np.ndarray,
    image: np.ndarray,
    thresholds: np.ndarray,
    label_categories: np.ndarray,
    n_categories: int,
) -> dict[str, np.ndarray]:
    """Every (image, unit) pair resized with PIL, no skipping, masks as dense booleans."""
    n, n_units = acts.shape[:2]
    sh, sw = pixel.shape[2:]
    n_labels = len(label_categories)
    out = {
        "intersection": np.zeros((n_units, n_labels), np.int64),
        "label_area": np.zeros(n_labels, np.int64),
        "mask_area": np.zeros(n_units, np.int64),
        "lite": np.zeros((n_units, n_categories), np.int64),
        "netdissect": np.zeros((n_units, n_categories), np.int64),
    }
    for i in range(n):
        present = {int(x) for x in np.unique(np.r_[pixel[i].ravel(), image[i]])}
        present = {x for x in present if x > 0 and label_categories[x] >= 0}
        masks = {
            c: (pixel[i] == c).any(axis=0) | bool((image[i] == c).any()) for c in present
        }
        in_image = {int(label_categories[c]) for c in present}
        for c, m in masks.items():
            out["label_area"][c] += m.sum()
        for u in range(n_units):
            image_u = Image.fromarray(acts[i, u])
            resized = np.asarray(image_u.resize((sw, sh), Image.Resampling.BILINEAR))
            mask = resized > thresholds[u]
            area = int(mask.sum())
            out["mask_area"][u] += area
            inside = set()
            for c, m in masks.items():
                both = int((mask & m).sum())
                out["intersection"][u, c] += both
                if both:
                    inside.add(int(label_categories[c]))
            for k in range(n_categories):
                out["lite"][u, k] += area * (k in inside)
                out["netdissect"][u, k] += area * (k in in_image)
    return out


def run_tally(
    acts: np.ndarray,
    pixel: np.ndarray,
    image: np.ndarray,
    thresholds: np.ndarray,
    label_categories: np.ndarray,
    chunk: int,
    first_unit: int = 0,
) -> TallyCounts:
    tally = IoUTally(thresholds, label_categories, len(CATEGORIES), first_unit=first_unit)
    for i0 in range(0, len(acts), chunk):
        tally.update(acts[i0 : i0 + chunk], LabelChunk(i0, pixel[i0 : i0 + chunk],
                                                       image[i0 : i0 + chunk]))
    return tally.result()


@pytest.mark.parametrize(
    ("in_size", "out_size"),
    [((7, 7), (112, 112)), ((14, 14), (112, 112)), ((13, 9), (112, 100)), ((1, 1), (16, 16)),
     ((3, 5), (7, 11)), ((28, 28), (28, 28))],
)
def test_resize_equals_pil_bilinear(in_size: tuple[int, int], out_size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    maps = (rng.standard_normal((4, *in_size)) * 3).astype(np.float32)
    ours = BilinearResize(in_size, out_size)(maps)
    pil = np.stack([
        np.asarray(Image.fromarray(m).resize(out_size[::-1], Image.Resampling.BILINEAR))
        for m in maps
    ])
    assert ours.shape == pil.shape
    np.testing.assert_allclose(ours, pil, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("in_size", "out_size"), [((7, 7), (56, 56)), ((5, 3), (40, 21)), ((4, 4), (4, 4))]
)
def test_runs_above_equal_dense_threshold(
    in_size: tuple[int, int], out_size: tuple[int, int]
) -> None:
    rng = np.random.default_rng(1)
    resize = BilinearResize(in_size, out_size)
    maps = (rng.standard_normal((30, *in_size)) * 2).astype(np.float32)
    maps[:10] = np.round(maps[:10])  # flat stretches and ties
    dense = resize(maps)
    thresholds = np.quantile(maps, rng.uniform(0.3, 1.0, 30)).astype(np.float32)
    thresholds[::3] = dense[::3].reshape(10, -1)[:, 5]  # exactly at a pixel's value
    size = out_size[0] * out_size[1]
    found = []
    for runs in resize.runs_above(maps, thresholds):
        assert np.all(np.diff(runs.index) >= 0)
        for m, x, y, length in zip(runs.index, runs.x, runs.y, runs.length, strict=True):
            found.extend(m * size + (y + np.arange(length)) * out_size[1] + x)
    expected = np.flatnonzero((dense > thresholds[:, None, None]).ravel())
    np.testing.assert_array_equal(np.sort(np.array(found, dtype=np.int64)), expected)


def test_run_ends_are_confirmed_when_values_sit_on_the_cut() -> None:
    rng = np.random.default_rng(9)
    weights = resize_axis(7, 112).patterns[1]  # an interior band: two taps, 16 rows
    column = rng.normal(size=(2000, 2)).astype(np.float32).astype(np.float64)
    column[:100, 1] = column[:100, 0]  # flat columns
    rows = rng.integers(0, 16, 2000)
    exact = column[:, :1] * weights[:, 0] + column[:, 1:] * weights[:, 1]  # (c, 16), as PIL
    cut = exact[np.arange(2000), rows]  # each cut equals one pixel's value
    first, stop, sure = _monotone_runs(column, weights, cut)
    above = exact > cut[:, None]
    runs = (np.arange(16) >= first[:, None]) & (np.arange(16) < stop[:, None])
    assert np.array_equal(runs[sure], above[sure])
    assert sure.mean() > 0.5
    # Weights that do not sum to one throw the estimate off: the check must notice.
    skewed, column, rows = weights * 1.3, column[100:], rows[100:]  # no flat columns
    exact = column[:, :1] * skewed[:, 0] + column[:, 1:] * skewed[:, 1]
    cut = exact[np.arange(1900), rows]
    first, stop, sure = _monotone_runs(column, skewed, cut)
    runs = (np.arange(16) >= first[:, None]) & (np.arange(16) < stop[:, None])
    assert np.array_equal(runs[sure], (exact > cut[:, None])[sure])
    assert not sure.all()


def test_thresholds_equal_np_quantile() -> None:
    rng = np.random.default_rng(2)
    acts = (rng.standard_normal((45, 6, 5, 4)) * rng.uniform(0.1, 5, (1, 6, 1, 1)))
    acts = acts.astype(np.float32)
    acts[:, 1] = np.maximum(acts[:, 1], 0)  # many ties at 0
    acts[:, 2] = 0  # a dead unit
    acts[:, 3] = np.round(acts[:, 3])  # few distinct values
    chunks = [acts[i : i + 8] for i in range(0, 45, 8)]
    for top_quantile in (0.005, 0.1, 0.5, 0.97, 1e-6, *rng.uniform(0, 1, 100).tolist()):
        got = unit_thresholds(lambda: iter(chunks), top_quantile)
        expected = np.array(
            [np.quantile(acts[:, u].ravel(), 1 - top_quantile) for u in range(6)]
        )
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
    # Few, spread values: the interpolation's rounding shows in the last bit.
    few = rng.standard_normal((7, 1, 1, 1)).astype(np.float32)
    for top_quantile in rng.uniform(0, 1, 200).tolist():
        got = unit_thresholds(lambda: iter([few]), top_quantile)
        np.testing.assert_array_equal(got, [np.quantile(few.ravel(), 1 - top_quantile)])


def test_float16_thresholds_in_one_pass_equal_np_quantile_of_their_float32_values() -> None:
    rng = np.random.default_rng(5)
    acts = (rng.standard_normal((45, 6, 5, 4)) * rng.uniform(0.1, 500, (1, 6, 1, 1)))
    acts = acts.astype(np.float16)
    acts[:, 1] = np.maximum(acts[:, 1], 0)  # many ties at +0
    acts[:, 2] = -0.0  # a dead unit, signed zeros
    acts[:, 3] = np.round(acts[:, 3])  # few distinct values
    acts[:, 4, 0, 0] = [65504, -65504, 6e-8] * 15  # the extremes, a subnormal
    chunks = [acts[i : i + 8] for i in range(0, 45, 8)]
    calls = 0

    def once() -> Iterator[np.ndarray]:
        nonlocal calls
        calls += 1
        return iter(chunks)

    wide = acts.astype(np.float32)
    for top_quantile in (0.005, 0.1, 0.5, 0.97, 1e-6, *rng.uniform(0, 1, 100).tolist()):
        calls = 0
        got = unit_thresholds(once, top_quantile)
        assert calls == 1 and got.dtype == np.float32
        expected = np.array(
            [np.quantile(wide[:, u].ravel(), 1 - top_quantile) for u in range(6)]
        )
        np.testing.assert_array_equal(got, expected)


def test_float16_nan_is_refused() -> None:
    acts = np.zeros((3, 2, 2, 2), dtype=np.float16)
    acts[1, 1, 0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        unit_thresholds(lambda: iter([acts]), 0.1)
    acts[1, 1, 0, 1] = -np.float16(np.nan)
    with pytest.raises(ValueError, match="NaN"):
        unit_thresholds(lambda: iter([acts]), 0.1)


def test_thresholds_need_the_same_chunks_twice() -> None:
    rng = np.random.default_rng(3)
    acts = rng.standard_normal((20, 2, 3, 3)).astype(np.float32)
    calls = iter([[acts], [acts + 100]])
    with pytest.raises(RuntimeError, match="pass 2"):
        unit_thresholds(lambda: iter(next(calls)), 0.1)


def test_planted_label_is_found_with_high_iou() -> None:
    rng = np.random.default_rng(4)
    n, target = 40, 7
    # Objects in 4×4 blocks, one block per raw cell; the target covers half the cells.
    blocks = np.where(rng.random((n, 14, 14)) < 0.5, target, rng.integers(1, 7, (n, 14, 14)))
    pixel = np.kron(blocks, np.ones((1, 4, 4), dtype=np.int64))[:, None].astype(np.int32)
    image = np.zeros((n, 1), np.int32)
    label_categories = np.array([-1] + [0] * 8, np.int32)
    # Unit 0: the target's share of each cell (its downsampled mask) plus noise; unit 1: noise.
    share = (blocks == target).astype(np.float32)
    acts = np.stack([share, rng.random((n, 14, 14))], axis=1)
    acts = (acts + rng.normal(0, 0.02, acts.shape)).astype(np.float32)
    thresholds = unit_thresholds(lambda: iter([acts]), float(share.mean()))
    counts = run_tally(acts, pixel, image, thresholds, label_categories, chunk=16)
    result = dissect(counts, make_concepts(label_categories), iou_mode="all")
    assert result[0].best.label == target
    assert result[0].best.iou > 0.9
    assert result[0].detector
    assert result[1].best.iou < 0.6


def test_tally_matches_brute_force_without_skipping() -> None:
    rng = np.random.default_rng(5)
    pixel, image, label_categories = random_probe(rng, 24, 28, 4, 40)
    acts = rng.standard_normal((24, 20, 7, 7)).astype(np.float32)
    acts[:, :10] = np.maximum(acts[:, :10], 0)
    thresholds = unit_thresholds(lambda: iter([acts]), 0.02)
    counts = run_tally(acts, pixel, image, thresholds, label_categories, chunk=10)
    expected = brute_force_tally(acts, pixel, image, thresholds, label_categories,
                                 len(CATEGORIES))
    firing = (acts.max(axis=(2, 3)) > thresholds).mean()
    assert 0.05 < firing < 0.9  # skipping really happens, and masks exist
    np.testing.assert_array_equal(counts.intersection, expected["intersection"])
    np.testing.assert_array_equal(counts.label_area, expected["label_area"])
    np.testing.assert_array_equal(counts.mask_area, expected["mask_area"])
    np.testing.assert_array_equal(counts.mask_area_lite, expected["lite"])
    np.testing.assert_array_equal(counts.mask_area_netdissect, expected["netdissect"])
    assert counts.n_images == 24


def test_tally_matches_brute_force_with_fine_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    # Labels changing from pixel to pixel: band columns hold one, two or many sets;
    # small groups of images and maps exercise every seam of the streaming.
    monkeypatch.setattr(unit_masks, "_GROUP_IMAGES", 3)
    monkeypatch.setattr(upsample, "_GROUP_MAPS", 4)
    rng = np.random.default_rng(10)
    pixel, image, label_categories = random_probe(rng, 14, 28, 1, 25)
    pixel[:, :, 8:20, 4:24] = pixel[:, :, 8:9, 4:24]  # and some tall uniform stretches
    acts = np.maximum(rng.standard_normal((14, 9, 7, 7)), 0).astype(np.float32)
    thresholds = unit_thresholds(lambda: iter([acts]), 0.05)
    counts = run_tally(acts, pixel, image, thresholds, label_categories, chunk=5)
    expected = brute_force_tally(acts, pixel, image, thresholds, label_categories,
                                 len(CATEGORIES))
    np.testing.assert_array_equal(counts.intersection, expected["intersection"])
    np.testing.assert_array_equal(counts.label_area, expected["label_area"])
    np.testing.assert_array_equal(counts.mask_area, expected["mask_area"])
    np.testing.assert_array_equal(counts.mask_area_lite, expected["lite"])
    np.testing.assert_array_equal(counts.mask_area_netdissect, expected["netdissect"])


def test_unit_blocks_give_the_rows_of_the_whole_layer() -> None:
    rng = np.random.default_rng(6)
    pixel, image, label_categories = random_probe(rng, 20, 28, 4, 30)
    acts = rng.standard_normal((20, 70, 7, 7)).astype(np.float32)
    chunks = [acts[i : i + 8] for i in range(0, 20, 8)]
    whole_thresholds = unit_thresholds(lambda: iter(chunks))
    whole = run_tally(acts, pixel, image, whole_thresholds, label_categories, chunk=8)
    for block in (1, 7, 64):
        for u0 in range(0, 70, block):
            u1 = min(u0 + block, 70)
            part = [c[:, u0:u1] for c in chunks]
            thresholds = unit_thresholds(part.__iter__)
            np.testing.assert_array_equal(thresholds, whole_thresholds[u0:u1])
            got = run_tally(acts[:, u0:u1], pixel, image, thresholds, label_categories,
                            chunk=8, first_unit=u0)
            assert got.first_unit == u0
            for name in ("intersection", "mask_area", "mask_area_lite", "mask_area_netdissect",
                         "top_images", "top_values"):
                np.testing.assert_array_equal(getattr(got, name), getattr(whole, name)[u0:u1])
            np.testing.assert_array_equal(got.label_area, whole.label_area)


def test_lite_iou_is_at_least_all_iou_when_a_category_is_missing() -> None:
    rng = np.random.default_rng(7)
    pixel, image, label_categories = random_probe(rng, 16, 28, 4, 20)
    label_categories[1:] = 0
    label_categories[[3, 4]] = 3  # two colours, painted on the first half of the images only
    pixel[np.isin(pixel, [3, 4])] = 1
    pixel[:, 2] = 0
    pixel[:8, 2, :14] = 3
    pixel[:8, 2, 14:] = 4
    image[:] = 0
    acts = rng.standard_normal((16, 5, 7, 7)).astype(np.float32)
    thresholds = unit_thresholds(lambda: iter([acts]), 0.05)
    counts = run_tally(acts, pixel, image, thresholds, label_categories, chunk=16)
    fires = acts.max(axis=(2, 3)) > thresholds
    assert fires[:8, 0].any() and fires[8:, 0].any()  # unit 0 fires with and without colour
    lite = iou(counts, label_categories, "lite")
    netdissect = iou(counts, label_categories, "netdissect")
    every = iou(counts, label_categories, "all")
    assert np.all(lite >= netdissect) and np.all(netdissect >= every)
    colour = 3 if counts.intersection[0, 3] else 4
    assert lite[0, colour] > every[0, colour] > 0


def test_exemplars_are_top_images_by_raw_max() -> None:
    rng = np.random.default_rng(8)
    pixel, image, label_categories = random_probe(rng, 30, 28, 4, 10)
    acts = rng.standard_normal((30, 3, 7, 7)).astype(np.float32)
    acts[:, 2] = 0  # all tied: the lowest image indices win
    counts = run_tally(acts, pixel, image, np.full(3, 5.0, np.float32), label_categories, 7)
    peak = acts.max(axis=(2, 3))
    for u in range(3):
        expected = np.lexsort((np.arange(30), -peak[:, u]))[:15]
        np.testing.assert_array_equal(counts.top_images[u], expected)
        np.testing.assert_array_equal(counts.top_values[u], peak[expected, u])


def test_label_sets_follow_union_semantics() -> None:
    pixel = np.zeros((1, 2, 2, 2), np.int32)
    pixel[0, 0] = [[1, 2], [3, 0]]
    pixel[0, 1] = [[1, 1], [4, 5]]
    image = np.array([[4, 0]], np.int32)
    label_categories = np.array([-1, 0, 0, 0, 1, -1], np.int32)  # label 5 is not selected
    sets = chunk_label_sets(LabelChunk(0, pixel, image), label_categories)
    members = [set(sets.rows[s][sets.rows[s] > 0]) for s in sets.pixel_set[0].ravel()]
    assert members == [{1, 4}, {1, 2, 4}, {3, 4}, {4}]
    area = np.zeros(6, np.int64)
    for s, count in enumerate(sets.pixel_count):
        area[sets.rows[s][sets.rows[s] > 0]] += count
    np.testing.assert_array_equal(area, [0, 2, 1, 1, 4, 0])


def test_dissection_summary_and_tally_csv() -> None:
    label_categories = np.array([-1, 0, 0, 1, 2, 3], np.int32)
    n_units = 3
    counts = TallyCounts(
        first_unit=10,
        n_images=4,
        thresholds=np.array([0.5, 0.6, 0.7], np.float32),
        intersection=np.array([[0, 50, 5, 0, 0, 1], [0, 1, 2, 30, 0, 0], [0, 1, 0, 0, 0, 0]]),
        label_area=np.array([0, 100, 80, 60, 40, 20]),
        mask_area=np.array([100, 100, 100]),
        mask_area_lite=np.full((n_units, 4), 100),
        mask_area_netdissect=np.full((n_units, 4), 100),
        top_images=np.tile(np.arange(3), (n_units, 1)),
        top_values=np.ones((n_units, 3), np.float32),
    )
    concepts = make_concepts(label_categories)
    result = dissect(counts, concepts)
    assert [d.unit for d in result] == [10, 11, 12]
    assert [d.best.label for d in result] == [1, 3, 1]
    assert [d.category for d in result] == ["object", "part", "object"]
    assert [d.detector for d in result] == [True, True, False]
    assert result[0].best.iou == pytest.approx(50 / 150)
    assert result[0].per_category["color"].label == 5
    names = concepts.label_names()
    rows = {d.unit: message_row(d.unit, result_message(d, names, concepts)) for d in result}
    summary = layer_summary(rows)
    assert summary["detectors"] == 2 and summary["unique_labels"] == 2
    assert summary["detectors_per_category"] == {"object": 1, "part": 1}

    rows = list(csv.DictReader(io.StringIO(tally_csv(result, concepts))))
    expected_header = ["unit", "category", "label", "score"]
    for cat in CATEGORIES:
        expected_header += [f"{cat}-label", f"{cat}-truth", f"{cat}-activation",
                            f"{cat}-intersect", f"{cat}-iou"]
    assert list(rows[0]) == expected_header
    assert [r["unit"] for r in rows] == ["11", "12", "13"]  # 1-based, by score descending
    assert rows[0]["label"] == "c1" and float(rows[0]["score"]) == pytest.approx(1 / 3)
    assert rows[0]["object-truth"] == "100" and rows[0]["object-intersect"] == "50"
    assert rows[0]["object-activation"] == "100"
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows),
                                                       reverse=True)
