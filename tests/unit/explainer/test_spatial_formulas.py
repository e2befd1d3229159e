"""Spatial compositional formulas: scores, operators, print/parse, beam search vs brute force."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest

from services.explainer.spatial_formulas import (
    And,
    Close,
    CloseTo,
    Formula,
    Not,
    Or,
    Primitive,
    SpatialSearch,
    UnitMask,
    With,
    and_not,
    close_to,
    conjoin,
    disjoin,
    evaluate,
    explain_unit,
    format_formula,
    parse_formula,
    score_masks,
    well_formed,
)
from services.explainer.spatial_masks import Grid, expand


def test_imrou_and_imroun_on_the_two_image_example() -> None:
    grid = Grid(2, 2)  # P = 4
    unit = UnitMask(grid.pack(np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool).reshape(2, 2, 2)), 4)
    formula = grid.pack(np.array([[1, 0, 0, 0], [1, 1, 1, 1]], bool).reshape(2, 2, 2))
    scores = score_masks(unit, formula[None])
    assert scores.iou[0] == pytest.approx(1 / 6)
    assert scores.imrou[0] == pytest.approx(0.104167, abs=1e-6)
    assert unit.normaliser == pytest.approx(0.625)
    assert scores.imroun[0] == pytest.approx(0.166667, abs=1e-6)
    # imroun is 1 at the unit's own mask, and r = 0 gives IoU.
    assert score_masks(unit, unit.bits[None]).imroun[0] == pytest.approx(1.0)
    plain = UnitMask(unit.bits, 4, r=0.0)
    assert score_masks(plain, formula[None]).imrou[0] == pytest.approx(1 / 6)


def _cells(*cells: tuple[int, int, int], n: int = 2) -> np.ndarray:
    out = np.zeros((n, 7, 7), dtype=bool)
    for image, i, j in cells:
        out[image, i, j] = True
    return out


@pytest.mark.parametrize(
    ("b_cell", "want"),
    [((0, 5, 4), {(0, 3, 3)}), ((0, 5, 5), set()), ((1, 5, 4), set())],
    ids=["distance √5", "distance √8", "another image"],
)
def test_close_to_on_the_7x7_examples(b_cell: tuple[int, int, int], want: set) -> None:
    grid = Grid(7, 7)
    masks = {Primitive(1): grid.pack(_cells((0, 3, 3))), Primitive(2): grid.pack(_cells(b_cell))}
    got = grid.unpack(evaluate(close_to(Primitive(1), Primitive(2)), masks.__getitem__, grid))
    assert set(zip(*np.nonzero(got), strict=True)) == want
    close = grid.unpack(evaluate(Close(Primitive(1), Primitive(2)), masks.__getitem__, grid))
    assert close.sum() == 2 * len(want)


def test_with_and_close_to_several_targets() -> None:
    grid = Grid(7, 7)
    masks = {
        Primitive(1): grid.pack(_cells((0, 0, 0), (0, 6, 6), (1, 3, 3))),
        Primitive(2): grid.pack(_cells((0, 1, 1), (0, 6, 4))),
        Primitive(3): grid.pack(_cells((0, 5, 6))),
    }
    with_2 = grid.unpack(evaluate(With(Primitive(1), Primitive(2)), masks.__getitem__, grid))
    assert set(zip(*np.nonzero(with_2), strict=True)) == {(0, 0, 0), (0, 6, 6)}
    both = close_to(close_to(Primitive(1), Primitive(2)), Primitive(3))
    assert both == CloseTo(Primitive(1), (Primitive(2), Primitive(3)))
    got = grid.unpack(evaluate(both, masks.__getitem__, grid))
    assert set(zip(*np.nonzero(got), strict=True)) == {(0, 6, 6)}


def test_flattening_and_rejections() -> None:
    a, b, c = Primitive(1), Primitive(2), Primitive(3, expanded=True)
    assert and_not(and_not(a, b), c) == And((a, Not(Or((b, c)))))
    assert disjoin(disjoin(a, b), c) == Or((a, b, c))
    assert conjoin(a, conjoin(b, c)) == And((a, b, c))
    assert not well_formed(Close(a, a)) and not well_formed(disjoin(disjoin(a, b), a))
    assert well_formed(Close(a, Primitive(1, expanded=True)))
    names = {1: "A", 2: "B", 3: "C"}
    assert format_formula(and_not(and_not(a, b), c), names) == "A AND NOT (B OR C-X)"
    assert format_formula(close_to(disjoin(a, c), b), names) == "(A OR C-X) CLOSE TO B"
    assert format_formula(close_to(close_to(a, b), c), names) == "A CLOSE TO (B & C-X)"


def _random_formula(rng: np.random.Generator, depth: int) -> Formula:
    if depth == 0 or rng.random() < 0.25:
        return Primitive(int(rng.integers(1, 7)), bool(rng.random() < 0.3))
    left, right = _random_formula(rng, depth - 1), _random_formula(rng, depth - 1)
    build: list[Callable[[Formula, Formula], Formula]] = [
        disjoin, conjoin, and_not, With, close_to, Close, lambda f, _: Not(f)
    ]
    return build[int(rng.integers(len(build)))](left, right)


def test_print_parse_round_trip_over_random_formulas() -> None:
    names = {1: "road", 2: "semidesert ground", 3: "with", 4: "blue-X", 5: 'a "b" (c)', 6: "&"}
    numbers = {v: k for k, v in names.items()}
    grid = Grid(5, 6)
    rng = np.random.default_rng(3)
    leaves = {
        Primitive(label, expanded): grid.pack(rng.random((4, 5, 6)) < 0.3)
        for label in names
        for expanded in (False, True)
    }
    for _ in range(300):
        formula = _random_formula(rng, 4)
        text = format_formula(formula, names)
        back = parse_formula(text, numbers)
        assert back == formula, text
        want = evaluate(formula, leaves.__getitem__, grid)
        assert (evaluate(back, leaves.__getitem__, grid) == want).all()
    for bad in ("road AND", "(road", "road CLOSE TO (blue-X &)", "nowhere"):
        with pytest.raises(ValueError):
            parse_formula(bad, numbers)


# -- beam search against an exhaustive dense reference -----------------------------------------


def dense_near(masks: np.ndarray) -> np.ndarray:
    """(N, h, w) bool -> cells with an on cell within squared distance 5 (clamped)."""
    h, w = masks.shape[1:]
    padded = np.pad(masks, ((0, 0), (2, 2), (2, 2)))
    out = np.zeros_like(masks)
    for di, dj in itertools.product(range(-2, 3), repeat=2):
        if di * di + dj * dj <= 5:
            out |= padded[:, 2 + di : 2 + di + h, 2 + dj : 2 + dj + w]
    return out


def dense_scores(unit: np.ndarray, mask: np.ndarray, r: float) -> tuple[float, float]:
    """(IoU, imroun) of one (N, h, w) bool formula mask, written out from the spec."""
    cells = unit[0].size
    n, f = unit.sum(axis=(1, 2)), mask.sum(axis=(1, 2))
    inter = int((unit & mask).sum())
    union = int(n.sum() + f.sum()) - inter
    imrou = (inter - r / cells * float((n * f).sum())) / union
    normaliser = (n.sum() - r / cells * float((n * n).sum())) / n.sum()
    return inter / union, imrou / normaliser


def exhaustive_best(unit: np.ndarray, prims: dict[str, np.ndarray], score: str) -> float:
    """The best score over every formula of at most two leaves and the close operator set."""
    formulas = dict(prims)
    for (a, ma), (b, mb) in itertools.permutations(prims.items(), 2):
        present = np.any(mb, axis=(1, 2)).reshape(-1, 1, 1)
        formulas[f"{a} OR {b}"] = ma | mb
        formulas[f"{a} AND {b}"] = ma & mb
        formulas[f"{a} AND NOT {b}"] = ma & ~mb
        formulas[f"{a} WITH {b}"] = ma & present
        formulas[f"{a} CLOSE TO {b}"] = ma & dense_near(mb)
        formulas[f"{a} CLOSE {b}"] = (ma & dense_near(mb)) | (mb & dense_near(ma))
    pick = 0 if score == "iou" else 1
    return max(dense_scores(unit, m, 0.75)[pick] for m in formulas.values())


def blobs(rng: np.random.Generator, n: int, shape: tuple[int, int], rate: float) -> np.ndarray:
    """(n, h, w) bool: random cells grown once, so labels are clumped like real ones."""
    seeds = rng.random((n, *shape)) < rate
    return expand(seeds, 1) & (rng.random((n, *shape)) < 0.7) | seeds


@pytest.mark.parametrize("score", ["iou", "imroun"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_beam_at_full_width_equals_the_exhaustive_optimum(score: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape, n_images = (5, 5), 16
    labels = {name: blobs(rng, n_images, shape, 0.12) for name in "abcd"}
    labels["a-X"] = expand(labels["a"], 3)
    labels["b-X"] = expand(labels["b"], 3)
    if seed % 2:
        unit = blobs(rng, n_images, shape, 0.1)  # no planted answer
    else:  # fires on a near b, plus noise: a spatial formula should win
        unit = (labels["a"] & dense_near(labels["b"])) ^ (rng.random((n_images, *shape)) < 0.04)
    names = list(labels)
    grid = Grid(*shape)
    prims = [Primitive(i + 1) for i in range(len(names))]
    masks = grid.pack(np.stack([labels[n] for n in names]))
    settings = SpatialSearch(beam=len(prims), max_length=2, score=score, min_coverage=0.0)  # type: ignore[arg-type]
    found = explain_unit(UnitMask(grid.pack(unit), grid.cells), prims, masks, grid, settings)
    best = exhaustive_best(unit, labels, score)
    assert found.formula is not None
    assert (found.iou if score == "iou" else found.imroun) == pytest.approx(best, abs=1e-12)
    # The reported scores are the formula's own, recomputed densely.
    dense = grid.unpack(evaluate(found.formula, lambda p: masks[p.label - 1], grid))
    assert (found.iou, found.imroun) == pytest.approx(dense_scores(unit, dense, 0.75))


def _planted_layer(seed: int, n_images: int, n_units: int) -> tuple[list[Primitive], np.ndarray,
                                                                    list[UnitMask], Grid]:
    """Labels on 7×7 and units each firing on one label close to another, with noise."""
    rng = np.random.default_rng(seed)
    grid = Grid(7, 7)
    labels = blobs(rng, 12 * n_images, (7, 7), 0.06).reshape(12, n_images, 7, 7)
    units = []
    for _ in range(n_units):
        a, b = rng.choice(12, 2, replace=False)
        fires = (labels[a] & dense_near(labels[b])) ^ (rng.random((n_images, 7, 7)) < 0.01)
        units.append(UnitMask(grid.pack(fires), grid.cells))
    return [Primitive(i + 1) for i in range(12)], grid.pack(labels), units, grid


def test_early_abort_keeps_the_mean_best_score_within_tolerance() -> None:
    prims, masks, units, grid = _planted_layer(4, 400, 12)
    on = SpatialSearch(beam=4, max_length=3, score="imroun", abort_images=100)
    off = SpatialSearch(beam=4, max_length=3, score="imroun", abort_fraction=0.0)
    best = {}
    for name, settings in (("on", on), ("off", off)):
        best[name] = [explain_unit(u, prims, masks, grid, settings).imroun for u in units]
    assert np.mean(best["on"]) == pytest.approx(np.mean(best["off"]), abs=0.01)
    assert min(best["off"]) > 0.5  # the planted answers are found at all
