from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize

from services.common.errors import InvalidArgument
from services.common.probe_format import LabelChunk
from services.explainer import linear
from services.explainer.linear import (
    ALPHA,
    LAMBDA,
    ImageSplit,
    calibrate_sigmoid,
    clip_concept_matrix,
    concept_filter,
    concept_moments,
    elastic_net,
    fit_units,
    format_explanation,
    greedy_selection,
    label_matrix,
    ranking_weights,
    split_images,
)

L1 = LAMBDA * ALPHA
L2 = LAMBDA * (1 - ALPHA)


def binary_concepts(n_images: int, n_concepts: int, seed: int) -> np.ndarray:
    """(N, C) float32 random binary concepts, some of them correlated and one duplicated."""
    rng = np.random.default_rng(seed)
    p = (rng.random((n_images, n_concepts)) < rng.uniform(0.1, 0.5, n_concepts)).astype(np.float32)
    p[:, 1] = np.maximum(p[:, 0], p[:, 1])  # a superclass-like column
    p[:, 2] = p[:, 0]  # an exact duplicate
    return p


# --- elastic net ----------------------------------------------------------------------


def enet_reference(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """The spec's objective solved directly: L-BFGS-B over w = w⁺ − w⁻ (w± ≥ 0) and b."""
    n, c = x.shape

    def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
        w = z[:c] - z[c : 2 * c]
        residual = y - x @ w - z[-1]
        value = residual @ residual / (2 * n) + L1 * z[: 2 * c].sum() + L2 / 2 * w @ w
        grad_w = -x.T @ residual / n + L2 * w
        grad = np.concatenate([grad_w + L1, -grad_w + L1, [-residual.sum() / n]])
        return value, grad

    bounds = [(0, None)] * (2 * c) + [(None, None)]
    found = minimize(
        objective,
        np.zeros(2 * c + 1),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": 50_000, "ftol": 1e-16, "gtol": 1e-13, "maxcor": 50},
    )
    return found.x[:c] - found.x[c : 2 * c], float(found.fun)


def standardised(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = p.astype(np.float64)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return x, (y - y.mean(axis=0)) / y.std(axis=0)


def test_elastic_net_matches_a_reference_solver_on_the_spec_objective() -> None:
    rng = np.random.default_rng(0)
    p = binary_concepts(400, 12, seed=1)
    truth = np.zeros((12, 5))
    truth[[0, 3, 5], 0] = [1.0, -0.5, 0.3]
    truth[[1, 4], 1] = [0.8, 0.8]
    truth[[2, 6, 7, 8], 2] = [0.2, 0.1, -0.3, 0.4]
    y = p @ truth + 0.5 * rng.standard_normal((400, 5))
    y[:, 3] = rng.standard_normal(400)  # no signal: weights (near) zero
    y[:, 4] = p[:, 0] + 0.01 * rng.standard_normal(400)  # a duplicated concept: split weight
    x, ys = standardised(p, y)
    ours = elastic_net(x.T @ x / len(x), x.T @ ys / len(x), L1, L2)
    for unit in range(5):
        expected, _ = enet_reference(x, ys[:, unit])
        np.testing.assert_allclose(ours[:, unit], expected, atol=2e-6)
    assert ours[0, 4] == pytest.approx(ours[2, 4], abs=1e-9) and ours[0, 4] > 0.3


def test_elastic_net_meets_its_optimality_conditions_tightly() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 30)) @ rng.standard_normal((30, 30)) * 0.3  # correlated
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    y = x[:, :3] @ np.array([1.0, -2.0, 0.5]) + rng.standard_normal(300)
    y = np.column_stack([y, -y, rng.standard_normal(300)])
    y = (y - y.mean(axis=0)) / y.std(axis=0)
    gram, cross = x.T @ x / 300, x.T @ y / 300
    w = elastic_net(gram, cross, L1, L2)
    gradient = cross - gram @ w - L2 * w  # must equal l1·sign(w) where w ≠ 0, |·| ≤ l1 elsewhere
    nonzero = w != 0
    np.testing.assert_allclose(gradient[nonzero], L1 * np.sign(w[nonzero]), atol=1e-8)
    assert np.abs(gradient[~nonzero]).max() <= L1 + 1e-8
    np.testing.assert_allclose(w[:, 1], -w[:, 0], atol=1e-12)


def test_elastic_net_solves_every_unit_as_if_alone() -> None:
    p = binary_concepts(300, 10, seed=3)
    y = p @ np.random.default_rng(4).standard_normal((10, 6)) + np.random.default_rng(
        5
    ).standard_normal((300, 6))
    x, ys = standardised(p, y)
    gram, cross = x.T @ x / 300, x.T @ ys / 300
    together = elastic_net(gram, cross, L1, L2)
    for unit in range(6):
        alone = elastic_net(gram, cross[:, unit : unit + 1], L1, L2)
        np.testing.assert_allclose(together[:, unit], alone[:, 0], atol=1e-8)


def train_statistics(
    p: np.ndarray, y: np.ndarray, split: ImageSplit
) -> tuple[np.ndarray, np.ndarray]:
    """(C, B) train cross-covariances and (B,) train variances of the units."""
    y_train = y[split.train]
    cross = (p[split.train].astype(np.float64).T @ (y_train - y_train.mean(axis=0))) / len(y_train)
    return cross, y_train.var(axis=0)


def test_ranking_weights_are_the_elastic_net_on_standardised_train_data() -> None:
    rng = np.random.default_rng(6)
    p = binary_concepts(500, 8, seed=7)
    y = p[:, [3, 5, 6]] @ np.array([[2.0, 0.0], [-1.0, 0.0], [0.7, 0.0]]) + rng.standard_normal(
        (500, 2)
    )
    y[:, 1] = 4.0  # a dead unit
    split = split_images(500, seed=1)
    cross, variance = train_statistics(p, y, split)
    weights = ranking_weights(concept_moments(p, split).train_cov, cross, variance)
    x, ys = standardised(p[split.train], y[split.train, :1])
    expected, _ = enet_reference(x, ys[:, 0])
    np.testing.assert_allclose(weights[:, 0], expected, atol=2e-6)
    assert np.argmax(weights[:, 0]) == 3 and np.argmin(weights[:, 0]) == 5
    assert not weights[:, 1].any()


# --- greedy selection and whole fits ---------------------------------------------------


def fit(
    p: np.ndarray, y: np.ndarray, seed: int = 0
) -> tuple[list[linear.LinearExplanation], ImageSplit]:
    split = split_images(len(p), seed)
    return fit_units(p, y, split, concept_moments(p, split)), split


def test_two_planted_concepts_are_selected_with_their_weights() -> None:
    rng = np.random.default_rng(8)
    p = (rng.random((3000, 20)) < 0.3).astype(np.float32)
    y = 3 * p[:, 3] + 2 * p[:, 7] + 1.0 + 0.3 * rng.standard_normal(3000)
    (explanation,), _ = fit(p, y[:, None])
    assert explanation.concepts == (3, 7)
    np.testing.assert_allclose(explanation.weights, [3.0, 2.0], rtol=0.05)
    assert explanation.bias == pytest.approx(1.0, abs=0.1)
    assert explanation.val_correlation > 0.9
    assert explanation.describe([f"c{i}" for i in range(20)]).startswith("3.0")


def greedy_by_hand(
    p: np.ndarray, y: np.ndarray, split: ImageSplit, ranking: np.ndarray
) -> tuple[list[int], np.ndarray, float]:
    """The spec's greedy selection, literally: lstsq on raw train columns, np.corrcoef on val."""
    p_train, p_val = p[split.train].astype(np.float64), p[split.val].astype(np.float64)
    y_train, y_val = y[split.train], y[split.val]
    selected: list[int] = []
    rejected: set[int] = set()
    best, coef = 0.0, np.zeros(1)
    while len(selected) < 10:
        candidates = [int(c) for c in ranking if c not in selected and c not in rejected][:10]
        results = []
        for c in candidates:
            design = np.column_stack([p_train[:, [*selected, c]], np.ones(len(p_train))])
            fitted = np.linalg.lstsq(design, y_train, rcond=None)[0]
            prediction = p_val[:, [*selected, c]] @ fitted[:-1] + fitted[-1]
            rho = float(np.corrcoef(prediction, y_val)[0, 1]) if prediction.std() > 1e-9 else 0.0
            results.append((c, rho, fitted))
        if selected:
            rejected |= {c for c, rho, _ in results if rho - best < 0.02}
            eligible = [r for r in results if r[0] not in rejected]
        else:
            eligible = [r for r in results if r[1] > 0]
        if not eligible:
            break
        c, best, coef = max(eligible, key=lambda r: r[1])
        selected.append(c)
    return selected, coef, best


def test_batched_greedy_equals_the_literal_algorithm() -> None:
    rng = np.random.default_rng(9)
    p = binary_concepts(1500, 40, seed=10)
    truth = rng.standard_normal((40, 8)) * (rng.random((40, 8)) < 0.3)
    y = p @ truth + rng.standard_normal((1500, 8)) * np.array([0.5, 1, 2, 4, 8, 0.2, 1, 3])
    explanations, split = fit(p, y, seed=11)
    cross, variance = train_statistics(p, y, split)
    weights = ranking_weights(concept_moments(p, split).train_cov, cross, variance)
    ranking = np.argsort(-weights.T, axis=1, kind="stable")
    lengths = set()
    for unit, explanation in enumerate(explanations):
        selected, coef, rho = greedy_by_hand(p, y[:, unit], split, ranking[unit])
        lengths.add(len(selected))
        by_concept = dict(zip(selected, coef[:-1], strict=True))
        assert sorted(explanation.concepts) == sorted(selected)
        np.testing.assert_allclose(
            explanation.weights, [by_concept[c] for c in explanation.concepts], atol=1e-6
        )
        assert explanation.bias == pytest.approx(coef[-1], abs=1e-6)
        assert explanation.val_correlation == pytest.approx(rho, abs=1e-9)
    assert len(lengths) > 2  # the units stop after different numbers of steps


def test_ten_concepts_are_named_right_and_predict_their_own_correlation() -> None:
    rng = np.random.default_rng(12)
    p = (rng.random((6000, 30)) < 0.4).astype(np.float32)
    weights = np.zeros(30)
    weights[:14] = np.linspace(3.0, 0.8, 14)
    y = (p @ weights + 0.2 * rng.standard_normal(6000))[:, None]
    (explanation,), split = fit(p, y, seed=13)
    assert len(explanation.concepts) == 10
    assert set(explanation.concepts) <= set(range(14))
    assert list(explanation.weights) == sorted(explanation.weights, reverse=True)
    # the stored concepts and weights themselves reproduce the stored val correlation
    columns = p[split.val][:, list(explanation.concepts)].astype(np.float64)
    prediction = columns @ np.array(explanation.weights) + explanation.bias
    assert np.corrcoef(prediction, y[split.val, 0])[0, 1] == pytest.approx(
        explanation.val_correlation, abs=1e-9
    )


def test_dead_unit_gets_an_empty_explanation() -> None:
    p = binary_concepts(400, 10, seed=14)
    y = np.column_stack(
        [np.full(400, 2.5), p[:, 4] + 0.1 * np.random.default_rng(0).standard_normal(400)]
    )
    dead, live = fit(p, y)[0]
    assert dead.concepts == () and dead.weights == () and dead.val_correlation == 0.0
    assert dead.bias == pytest.approx(2.5)
    assert dead.describe([]) == "2.50"
    assert live.concepts[0] == 4


def test_no_concept_left_after_filtering_gives_bias_only_explanations() -> None:
    y = np.random.default_rng(1).standard_normal((100, 2))
    explanations, split = fit(np.zeros((100, 0), dtype=np.float32), y)
    assert [e.concepts for e in explanations] == [(), ()]
    np.testing.assert_allclose([e.bias for e in explanations], y[split.train].mean(axis=0))


def test_greedy_stops_without_a_positive_first_candidate() -> None:
    ranking = np.array([[0, 1]])
    cov = np.eye(2)
    chosen, weights, best = greedy_selection(
        ranking, cov, np.array([[1.0], [0.5]]), cov, np.array([[-1.0], [-0.5]]), np.array([1.0])
    )
    assert chosen[0].size == 0 and weights[0].size == 0 and best[0] == 0.0


# --- explanation text -----------------------------------------------------------------


def test_explanation_format() -> None:
    assert format_explanation(["cat", "dog"], [0.22, 0.61], 0.05) == "0.61·dog + 0.22·cat + 0.05"
    assert format_explanation(["a", "b"], [-0.3, 1.0], -0.25) == "1.00·b - 0.30·a - 0.25"
    assert format_explanation([], [], 0.05) == "0.05"


# --- split ----------------------------------------------------------------------------


def test_split_is_seeded_70_10_20_and_survives_json() -> None:
    split = split_images(1000, seed=42)
    assert (len(split.train), len(split.val), len(split.test)) == (700, 100, 200)
    everything = np.concatenate([split.train, split.val, split.test])
    np.testing.assert_array_equal(np.sort(everything), np.arange(1000))
    again = ImageSplit.from_json(json.loads(json.dumps(split.to_json())))
    for a, b in ((split.train, again.train), (split.val, again.val), (split.test, again.test)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(split_images(1000, seed=42).test, split.test)
    assert not np.array_equal(split_images(1000, seed=43).test, split.test)


def test_too_few_images_for_a_split() -> None:
    with pytest.raises(InvalidArgument) as caught:
        split_images(12, seed=0)
    assert caught.value.field == "n_images"


def test_concept_moments_are_the_population_covariances() -> None:
    p = binary_concepts(200, 6, seed=15)
    split = split_images(200, seed=2)
    moments = concept_moments(p, split)
    np.testing.assert_allclose(moments.train_cov, np.cov(p[split.train].T, bias=True), atol=1e-12)
    np.testing.assert_allclose(moments.val_mean, p[split.val].mean(axis=0), atol=1e-12)


# --- concept matrices ------------------------------------------------------------------


def chunks() -> list[LabelChunk]:
    # 3 images, 2 planes of 2x2 pixels; image 0 has label 5 on both planes at pixel 0
    pixel = np.zeros((3, 2, 2, 2), dtype=np.int32)
    pixel[0, 0] = [[5, 5], [7, 0]]
    pixel[0, 1] = [[5, 0], [0, 9]]
    pixel[1, 1] = [[7, 7], [7, 7]]
    image = np.array([[0, 0], [3, 0], [3, 12]], dtype=np.int32)
    return [
        LabelChunk(i0=2, pixel=pixel[2:], image=image[2:]),
        LabelChunk(i0=0, pixel=pixel[:2], image=image[:2]),
    ]


def test_label_matrix_marks_pixel_and_image_labels() -> None:
    p = label_matrix(chunks(), 3, concept_numbers=[7, 5, 3, 9])
    np.testing.assert_array_equal(p, [[1, 1, 0, 1], [1, 0, 1, 0], [0, 0, 1, 0]])
    assert p.dtype == np.float32


def test_label_matrix_coverage_counts_a_pixel_once() -> None:
    p = label_matrix(chunks(), 3, concept_numbers=[7, 5, 3, 9], coverage=True)
    np.testing.assert_allclose(
        p, [[0.25, 0.5, 0.0, 0.25], [1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    )


@pytest.mark.parametrize("which", ["missing", "repeated"])
def test_label_chunks_must_cover_every_image_once(which: str) -> None:
    given = chunks()[1:] if which == "missing" else [*chunks(), chunks()[0]]
    with pytest.raises(InvalidArgument) as caught:
        label_matrix(given, 3, concept_numbers=[7, 5])
    assert caught.value.field == "label_chunks"


def test_clip_concept_matrix_is_a_shifted_sigmoid() -> None:
    s = np.array([[0.1, 0.3], [0.25, -0.2]], dtype=np.float32)
    expected = 1 / (1 + np.exp(-60 * (s.astype(np.float64) - 0.09)))
    np.testing.assert_allclose(clip_concept_matrix(s, 60, -0.09), expected, rtol=1e-5)


def test_calibration_finds_the_grid_minimum_of_the_exact_bce() -> None:
    rng = np.random.default_rng(16)
    s = rng.uniform(0.0, 0.4, size=(400, 3))
    labels = rng.random((400, 3)) < 1 / (1 + np.exp(-30 * (s - 0.25)))
    a, b = calibrate_sigmoid(s, labels)

    def bce(a: float, b: np.ndarray) -> np.ndarray:
        z = a * (s.ravel()[None, :] + b[:, None])
        return np.where(labels.ravel(), np.logaddexp(0, -z), np.logaddexp(0, z)).mean(axis=1)

    b_grid = np.asarray(linear.B_GRID)
    exact = np.array([bce(grid_a, b_grid) for grid_a in linear.A_GRID])
    assert bce(a, np.array([b]))[0] <= exact.min() + 1e-6
    assert 20 <= a <= 44 and b == pytest.approx(-0.25, abs=0.03)


def test_concept_filter_needs_top_five_mean_and_variation() -> None:
    p = np.zeros((50, 5), dtype=np.float32)
    p[:4, 0] = 1.0  # top-5 mean 0.8: kept
    p[:2, 1] = 1.0  # top-5 mean 0.4: dropped
    p[:, 2] = 0.9  # constant: dropped
    p[:, 3] = np.linspace(0, 0.45, 50)  # never reaches 0.5: dropped
    p[:, 4] = np.linspace(0, 1, 50)  # kept
    np.testing.assert_array_equal(concept_filter(p), [True, False, False, False, True])
