from __future__ import annotations

import math

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.explainer.linear import concept_moments, fit_units, split_images
from services.explainer.simulation import (
    LayerScore,
    layer_score,
    method_scores,
    predict_formula,
    predict_label,
    predict_linear,
    unit_correlations,
)

P_SIM = np.array(
    [[0.0, 1.0, 0.5], [1.0, 0.0, 0.25], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32
)


def test_predictions_follow_each_explanation_kind() -> None:
    np.testing.assert_allclose(
        predict_linear(P_SIM, [1, 2], [2.0, -1.0], 0.5), [2.0, 0.25, 2.5, -0.5]
    )
    np.testing.assert_allclose(predict_label(P_SIM, 2), [0.5, 0.25, 0.0, 1.0])
    np.testing.assert_allclose(
        predict_formula(P_SIM, [(0, False), (2, True)]), [0.25, 0.875, 1.0, 0.0]
    )


def test_a_formula_needs_a_leaf() -> None:
    with pytest.raises(InvalidArgument):
        predict_formula(P_SIM, [])


def test_correlations_are_pearson_per_unit() -> None:
    rng = np.random.default_rng(0)
    activations = rng.standard_normal((50, 4))
    predictions = activations + rng.standard_normal((50, 4)) * [0.1, 1.0, 3.0, 10.0]
    rho = unit_correlations(predictions, activations)
    expected = [np.corrcoef(predictions[:, u], activations[:, u])[0, 1] for u in range(4)]
    np.testing.assert_allclose(rho, expected, atol=1e-12)


def test_dead_units_are_counted_apart_and_never_make_the_mean_nan() -> None:
    rng = np.random.default_rng(1)
    activations = rng.standard_normal((40, 5))
    activations[:, 1] = 0.0
    activations[:, 3] = 2.5
    predictions = activations + rng.standard_normal((40, 5))
    score = layer_score(predictions, activations)
    rho = unit_correlations(predictions, activations)
    live = rho[[0, 2, 4]]
    assert math.isnan(rho[1]) and math.isnan(rho[3])
    assert (score.scored, score.dead, score.missing) == (3, 2, 0)
    assert score.mean == pytest.approx(live.mean())
    assert score.stderr == pytest.approx(live.std(ddof=1) / math.sqrt(3))


def test_missing_predictions_are_counted_apart() -> None:
    rng = np.random.default_rng(2)
    activations = rng.standard_normal((30, 3))
    predictions = activations.copy()
    predictions[:, 2] = np.nan
    score = layer_score(predictions, activations)
    assert (score.scored, score.dead, score.missing) == (2, 0, 1)
    assert score.mean == pytest.approx(1.0)


def test_a_constant_prediction_of_a_live_unit_scores_zero() -> None:
    activations = np.arange(10.0)[:, None]
    assert unit_correlations(np.full((10, 1), 0.3), activations)[0] == 0.0


def test_a_layer_of_dead_units_has_no_mean() -> None:
    score = layer_score(np.ones((5, 2)), np.zeros((5, 2)))
    assert score == LayerScore(mean=None, stderr=None, scored=0, dead=2, missing=0)


def test_shapes_must_match() -> None:
    with pytest.raises(InvalidArgument):
        unit_correlations(np.zeros((5, 2)), np.zeros((5, 3)))


def test_linear_explanations_beat_single_labels_on_the_test_split() -> None:
    rng = np.random.default_rng(3)
    p = (rng.random((4000, 12)) < 0.3).astype(np.float32)
    activations = np.column_stack(
        [2 * p[:, 0] + p[:, 5], p[:, 3] + p[:, 4] + p[:, 7]]
    ) + 0.3 * rng.standard_normal((4000, 2))
    split = split_images(4000, seed=5)
    explanations = fit_units(p, activations, split, concept_moments(p, split))
    test_p, test_y = p[split.test], activations[split.test]
    linear = np.column_stack(
        [predict_linear(test_p, e.concepts, e.weights, e.bias) for e in explanations]
    )
    label = np.column_stack([predict_label(test_p, e.concepts[0]) for e in explanations])
    scores = method_scores({"linear": linear, "label": label}, test_y)
    assert scores["linear"].scored == 2 and scores["linear"].mean is not None
    assert scores["label"].mean is not None
    assert scores["linear"].mean > 0.9 > scores["label"].mean
