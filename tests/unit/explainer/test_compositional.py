"""Compositional explanations: formulas, printing and parsing, label-set tables, beam search.

The search is checked against a dense reference written here: full-dataset boolean
masks for every label, every candidate formula evaluated pixel by pixel, no label
left out.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.common.probe_format import Concept, ConceptTable, LabelChunk
from services.explainer.compositional import (
    And,
    Explanation,
    Formula,
    LabelSetTable,
    Leaf,
    Not,
    Or,
    SearchSettings,
    UnitLabelSets,
    canonical_key,
    dataset_label_sets,
    explain_unit,
    explain_units,
    format_formula,
    leaves,
    parse_formula,
    score_formula,
)
from services.explainer.netdissect import IoUTally, dissect, unit_thresholds
from services.explainer.upsample import BilinearResize


def dense_label_masks(
    pixel: np.ndarray, image: np.ndarray, label_categories: np.ndarray
) -> dict[int, np.ndarray]:
    """Label → (N, sh, sw) bool: any pixel plane holds it, or it is an image-level label."""
    masks = {}
    for label in np.flatnonzero(label_categories >= 0):
        if label > 0:
            by_image = (image == label).any(axis=1)[:, None, None]
            masks[int(label)] = (pixel == label).any(axis=1) | by_image
    return masks


def dense_mask(
    formula: Formula, masks: dict[int, np.ndarray], shape: tuple[int, ...]
) -> np.ndarray:
    if isinstance(formula, Leaf):
        return masks.get(formula.label, np.zeros(shape, bool))
    if isinstance(formula, Not):
        return ~dense_mask(formula.operand, masks, shape)
    left, right = dense_mask(formula.left, masks, shape), dense_mask(formula.right, masks, shape)
    return left & right if isinstance(formula, And) else left | right


def dense_search(
    unit_mask: np.ndarray,
    masks: dict[int, np.ndarray],
    candidates: list[int],
    settings: SearchSettings,
) -> list[tuple[Formula, float]]:
    """The spec's beam search, every candidate formula scored on dense masks: final beam."""
    shape = unit_mask.shape
    total = int(unit_mask.sum())

    def score(mask: np.ndarray) -> tuple[int, float]:
        inside = int((unit_mask & mask).sum())
        union = total + int(mask.sum()) - inside
        return inside, inside / union if union else 0.0

    labels = sorted(candidates)
    primitive = {label: score(dense_mask(Leaf(label), masks, shape)) for label in labels}
    if settings.top_k is not None:
        labels = sorted(sorted(labels, key=lambda x: (-primitive[x][1], x))[: settings.top_k])
    beam: list[tuple[Formula, int, float, float]] = [  # (formula, length, iou, rank)
        (Leaf(x), 1, primitive[x][1], primitive[x][1]) for x in labels if primitive[x][0]
    ]
    beam = sorted(beam, key=lambda e: -e[3])[: settings.beam]
    for length in range(2, settings.max_length + 1):
        pool = list(beam)
        seen = {canonical_key(e[0]) for e in pool}
        for parent, *_ in beam:
            parent_mask = dense_mask(parent, masks, shape)
            for build in (Or, And, lambda f, g: And(f, Not(g))):
                for label in labels:
                    formula = build(parent, Leaf(label))
                    mask = dense_mask(formula, masks, shape)
                    inside, value = score(mask)
                    key = canonical_key(formula)
                    if inside and not np.array_equal(mask, parent_mask) and key not in seen:
                        seen.add(key)
                        rank = value * settings.length_penalty ** (length - 1)
                        pool.append((formula, length, value, rank))
        beam = sorted(pool, key=lambda e: -e[3])[: settings.beam]
    return [(e[0], e[2]) for e in beam]


def final_beam(found: Explanation) -> list[tuple[Formula, float]]:
    return [] if found.formula is None else [(found.formula, found.iou), *found.runners_up]


def block_probe(
    rng: np.random.Generator, n: int, grid: int, cell: int, n_labels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two pixel planes of cell×cell blocks on a grid×grid raw layout, and image labels."""
    planes = []
    for p in range(2):
        blocks = rng.integers(1, n_labels + 1, (n, grid, grid))
        blocks[rng.random((n, grid, grid)) < 0.4 * p] = 0
        planes.append(np.kron(blocks, np.ones((1, cell, cell), dtype=np.int64)))
    pixel = np.stack(planes, axis=1).astype(np.int32)
    image = np.where(rng.random((n, 1)) < 0.3, rng.integers(1, n_labels + 1, (n, 1)), 0)
    label_categories = np.r_[-1, rng.integers(0, 3, n_labels)].astype(np.int32)
    return pixel, image.astype(np.int32), label_categories


def unit_tables(
    acts: np.ndarray,
    pixel: np.ndarray,
    image: np.ndarray,
    thresholds: np.ndarray,
    label_categories: np.ndarray,
    chunk: int,
) -> tuple[list[LabelSetTable], LabelSetTable]:
    chunks = [LabelChunk(i0, pixel[i0 : i0 + chunk], image[i0 : i0 + chunk])
              for i0 in range(0, len(pixel), chunk)]
    accumulator = UnitLabelSets(thresholds, label_categories)
    for c in chunks:
        accumulator.update(acts[c.i0 : c.i1], c)
    return accumulator.tables(), dataset_label_sets(chunks, label_categories)


def dense_unit_masks(acts: np.ndarray, thresholds: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    n, n_units, h, w = acts.shape
    resized = BilinearResize((h, w), size)(acts.transpose(1, 0, 2, 3).reshape(-1, h, w))
    return resized.reshape(n_units, n, *size) > thresholds[:, None, None, None]


NAMES = {1: "water", 2: "river", 3: "blue", 4: "traffic light", 5: "NOT", 6: 'a "b" (c)',
         7: "sky"}


@pytest.mark.parametrize(
    "formula",
    [
        Leaf(1),
        And(Or(Leaf(1), Leaf(2)), Not(Leaf(3))),
        Or(And(Leaf(4), Leaf(5)), Leaf(6)),
        And(And(Leaf(1), Leaf(2)), Leaf(3)),
        Or(Leaf(1), And(Leaf(2), Not(Or(Leaf(6), Leaf(4))))),
        Not(Not(Leaf(5))),
        And(Not(And(Leaf(1), Leaf(7))), Or(Leaf(2), Leaf(3))),
    ],
)
def test_formula_prints_and_parses_back(formula: Formula) -> None:
    text = format_formula(formula, NAMES)
    assert parse_formula(text, {name: number for number, name in NAMES.items()}) == formula


def test_formula_text() -> None:
    formula = And(Or(Leaf(1), Leaf(2)), Not(Leaf(3)))
    assert format_formula(formula, NAMES) == "(water OR river) AND NOT blue"
    numbers = {name: number for number, name in NAMES.items()}
    assert parse_formula("water OR river AND NOT blue", numbers) == Or(
        Leaf(1), And(Leaf(2), Not(Leaf(3)))
    )
    assert parse_formula("traffic light or sky", numbers) == Or(Leaf(4), Leaf(7))
    assert leaves(formula) == [1, 2, 3]
    for bad in ("water OR", "(water", "water river", "NOT", "water ) blue"):
        with pytest.raises(ValueError):
            parse_formula(bad, numbers)


def test_canonical_key_ignores_order_of_and_or() -> None:
    a, b, c = Leaf(1), Leaf(2), Leaf(3)
    assert canonical_key(Or(Or(a, b), c)) == canonical_key(Or(Or(c, a), b))
    assert canonical_key(And(a, Not(b))) == canonical_key(And(Not(b), a))
    assert canonical_key(Or(And(a, b), c)) != canonical_key(And(Or(a, b), c))
    assert canonical_key(And(a, Not(b))) != canonical_key(And(b, Not(a)))


def test_search_matches_dense_reference() -> None:
    rng = np.random.default_rng(0)
    pixel, image, label_categories = block_probe(rng, 30, 4, 4, 25)
    label_categories[[5, 9]] = -1
    # Label 20 only ever lies on label 3: 3 OR 20 and 20 AND 3 repeat their parent.
    pixel[:, 1][pixel[:, 1] == 20] = 0
    pixel[:, 1][pixel[:, 0] == 3] = 20
    acts = rng.standard_normal((30, 10, 4, 4)).astype(np.float32)
    thresholds = unit_thresholds(lambda: iter([acts]), 0.05)
    tables, dataset = unit_tables(acts, pixel, image, thresholds, label_categories, chunk=8)
    candidates = [x for x in range(1, 26) if label_categories[x] >= 0]
    masks = dense_label_masks(pixel, image, label_categories)
    unit_masks = dense_unit_masks(acts, thresholds, (16, 16))
    for settings in (SearchSettings(), SearchSettings(beam=3, max_length=4), SearchSettings(beam=2),
                     SearchSettings(top_k=6), SearchSettings(length_penalty=0.9)):
        found = explain_units(tables, dataset, np.array(candidates), settings)
        for u in range(10):
            assert final_beam(found[u]) == dense_search(unit_masks[u], masks, candidates, settings)
            formula = found[u].formula
            if formula is not None:
                rescored = score_formula(formula, tables[u], dataset)
                assert rescored.iou == found[u].iou
                assert found[u].mask_area == unit_masks[u].sum()


def test_planted_formula_is_found() -> None:
    rng = np.random.default_rng(1)
    n, grid, cell = 60, 8, 4
    water, river, blue = 1, 2, 3
    # One label per raw cell and plane: objects (water, river, others) and colours.
    objects = rng.choice([water, river, 4, 5, 6, 7], (n, grid, grid), p=[0.3, 0.3, 0.1, 0.1,
                                                                         0.1, 0.1])
    colours = rng.choice([blue, 8, 9], (n, grid, grid), p=[0.15, 0.45, 0.4])
    pixel = np.kron(np.stack([objects, colours], axis=1), np.ones((1, 1, cell, cell), np.int64))
    pixel = pixel.astype(np.int32)
    image = np.zeros((n, 1), np.int32)
    label_categories = np.array([-1] + [0] * 9, np.int32)
    planted = And(Or(Leaf(water), Leaf(river)), Not(Leaf(blue)))
    masks = dense_label_masks(pixel, image, label_categories)
    truth = dense_mask(planted, masks, masks[1].shape)
    # Raw activations: the formula's share of each cell (its downsampled mask), plus noise.
    share = truth.reshape(n, grid, cell, grid, cell).mean(axis=(2, 4))
    acts = (share + rng.normal(0, 0.02, share.shape))[:, None].astype(np.float32)
    thresholds = unit_thresholds(lambda: iter([acts]), float(truth.mean()))
    tables, dataset = unit_tables(acts, pixel, image, thresholds, label_categories, chunk=20)
    found = explain_unit(tables[0], dataset, np.arange(1, 10))
    assert found.formula is not None
    assert canonical_key(found.formula) == canonical_key(planted)
    assert found.iou > 0.9
    assert found.length == 3


def test_length_one_is_the_best_primitive_under_mode_all() -> None:
    rng = np.random.default_rng(2)
    pixel, image, label_categories = block_probe(rng, 24, 7, 4, 30)
    acts = rng.standard_normal((24, 12, 7, 7)).astype(np.float32)
    thresholds = unit_thresholds(lambda: iter([acts]))
    tables, dataset = unit_tables(acts, pixel, image, thresholds, label_categories, chunk=10)
    tally = IoUTally(thresholds, label_categories, 3)
    for i0 in range(0, 24, 10):
        tally.update(acts[i0 : i0 + 10], LabelChunk(i0, pixel[i0 : i0 + 10], image[i0 : i0 + 10]))
    concepts = ConceptTable(
        dataset_key="t", categories=["a", "b", "c"],
        labels=[Concept(x, f"l{x}", "abc"[label_categories[x]]) for x in range(1, 31)],
        n_images=24, image_size=(0, 0), mask_size=(28, 28), chunk_size=10, plane_categories=[],
    )
    best = dissect(tally.result(), concepts, iou_mode="all")
    found = explain_units(tables, dataset, np.arange(1, 31), SearchSettings(max_length=1))
    assert sum(d.best.iou > 0 for d in best) >= 10
    for unit, dissection in zip(found, best, strict=True):
        if dissection.best.iou > 0:
            assert unit.formula == Leaf(dissection.best.label)
            assert unit.iou == pytest.approx(dissection.best.iou, rel=1e-12)


def test_pruned_labels_change_nothing() -> None:
    """Labels absent from every firing image are never kept as leaves or AND partners,
    yet the search equals the dense one that tries every label in every position;
    one of them is needed in AND NOT."""
    rng = np.random.default_rng(3)
    n, grid, cell = 40, 4, 4
    pixel, image, label_categories = block_probe(rng, n, grid, cell, 10)
    label_categories[1:] = 0
    image[:] = 0
    pixel[:, 1] = 0
    sky, cloud = 1, 11  # cloud: only in images where the unit never fires
    label_categories = np.r_[label_categories, 0].astype(np.int32)
    pixel[: n // 2, 0, :8] = sky
    pixel[n // 2 :, 0, :8] = sky
    pixel[n // 2 :, 1, :8] = cloud
    acts = np.zeros((n, 1, grid, grid), np.float32)
    acts[: n // 2, 0, :2] = 1 + rng.normal(0, 0.01, (n // 2, 2, grid))
    thresholds = np.array([0.5], np.float32)
    tables, dataset = unit_tables(acts, pixel, image, thresholds, label_categories, chunk=10)
    candidates = list(range(1, 12))
    found = explain_unit(tables[0], dataset, np.array(candidates))
    masks = dense_label_masks(pixel, image, label_categories)
    expected = dense_search(dense_unit_masks(acts, thresholds, (16, 16))[0], masks, candidates,
                            SearchSettings())
    assert final_beam(found) == expected
    assert found.formula == And(Leaf(sky), Not(Leaf(cloud)))
    assert tables[0].cooccurrence(frozenset())[cloud] == 0


def test_label_set_table_counts() -> None:
    rows = np.array([[3, 1, 0], [2, 0, 0], [3, 2, 1], [0, 0, 0]], np.int32)
    table = LabelSetTable.merge([rows, rows[:2]], [np.array([5, 7, 2, 11]), np.array([1, 1])], 4)
    assert table.total() == 27
    np.testing.assert_array_equal(table.cooccurrence(frozenset()), [0, 8, 10, 8])
    np.testing.assert_array_equal(table.cooccurrence(frozenset({1})), [0, 8, 2, 8])
    assert table.size(frozenset({2, 3})) == 2
    unit = LabelSetTable.merge([rows[:2]], [np.array([1, 1])], 4)
    found = score_formula(Or(Leaf(2), Not(Leaf(3))), unit, table)
    # |NOT 3| = 27 - 8 = 19, |2 OR NOT 3| = 19 + 2 (sets {3,2,1}) = 21
    assert (found.intersection, found.formula_area, found.mask_area) == (1, 21, 2)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        SearchSettings(beam=0)
    with pytest.raises(ValueError):
        SearchSettings(length_penalty=0.0)
