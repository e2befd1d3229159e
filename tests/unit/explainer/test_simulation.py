from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.explainer.linear import concept_moments, fit_units, split_images
from services.explainer.methods.simulation import layer_summary, score_rows
from services.explainer.simulated_predictions import Simulator
from services.explainer.simulation import (
    predict_formula,
    predict_label,
    predict_linear,
    unit_correlations,
)


def _summary(
    p_sim: np.ndarray, activations: np.ndarray, rows: dict[str, list[dict[str, Any] | None]]
) -> dict[str, Any]:
    """The shipped layer summary of the shipped rows scoring `rows` against `activations`."""
    sim = Simulator("labels", [f"c{i}" for i in range(p_sim.shape[1])], p_sim)
    return layer_summary({r["unit"]: r for r in score_rows(0, sim, activations, rows)})


def _identity_rows(n_units: int, absent: tuple[int, ...] = ()) -> list[dict[str, Any] | None]:
    """Linear rows predicting unit u by P_sim column u (a concept P_sim lacks for `absent`)."""
    return [
        {"terms": [{"concept": "absent" if u in absent else f"c{u}", "weight": 1.0}]}
        for u in range(n_units)
    ]


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
    summary = _summary(predictions, activations, {"linear": _identity_rows(5)})
    rho = unit_correlations(predictions, activations)
    live = rho[[0, 2, 4]]
    assert math.isnan(rho[1]) and math.isnan(rho[3])
    assert (summary["dead_units"], summary["scored_units"]["linear"]) == (2, 3)
    assert summary["simulation_mean"]["linear"] == pytest.approx(live.mean())
    assert summary["simulation_sem"]["linear"] == pytest.approx(live.std(ddof=1) / math.sqrt(3))


def test_missing_predictions_are_counted_apart() -> None:
    rng = np.random.default_rng(2)
    activations = rng.standard_normal((30, 3))
    summary = _summary(activations, activations, {"linear": _identity_rows(3, absent=(2,))})
    assert (summary["dead_units"], summary["scored_units"]["linear"]) == (0, 2)
    assert summary["simulation_mean"]["linear"] == pytest.approx(1.0)


def test_a_constant_prediction_of_a_live_unit_scores_zero() -> None:
    activations = np.arange(10.0)[:, None]
    assert unit_correlations(np.full((10, 1), 0.3), activations)[0] == 0.0


def test_a_layer_of_dead_units_has_no_mean() -> None:
    summary = _summary(np.ones((5, 2)), np.zeros((5, 2)), {"linear": _identity_rows(2)})
    assert summary["dead_units"] == 2 and summary["simulation_mean"] == {}


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
    names = [f"c{i}" for i in range(p.shape[1])]
    rows: dict[str, list[dict[str, Any] | None]] = {
        "linear": [
            {
                "terms": [
                    {"concept": names[c], "weight": w}
                    for c, w in zip(e.concepts, e.weights, strict=True)
                ],
                "bias": e.bias,
            }
            for e in explanations
        ],
        "netdissect": [{"label": names[e.concepts[0]]} for e in explanations],
    }
    summary = _summary(p[split.test], activations[split.test], rows)
    assert summary["scored_units"] == {"linear": 2, "netdissect": 2}
    means = summary["simulation_mean"]
    assert means["linear"] > 0.9 > means["netdissect"]
