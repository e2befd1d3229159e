"""Stored explanations as predictions for simulation scoring: spatial formulas."""

from __future__ import annotations

import numpy as np

from services.explainer.simulated_predictions import Simulator, predict_row
from services.explainer.simulation import predict_formula


def test_simulation_predicts_a_spatial_formula_from_its_labels() -> None:
    matrix = np.random.default_rng(0).random((30, 3)).astype(np.float32)
    sim = Simulator("labels", ["yellow", "blue", "road"], matrix)
    for formula, leaves in (
        ("yellow CLOSE TO blue-X", [(0, False), (1, False)]),
        ("(yellow AND NOT road) WITH blue", [(0, False), (2, True), (1, False)]),
    ):
        got = predict_row("compositional", {"formula": formula}, sim, sim.columns())
        assert np.allclose(got, predict_formula(matrix, leaves)), formula
    unknown = predict_row("compositional", {"formula": "sky CLOSE sea"}, sim, sim.columns())
    assert np.isnan(unknown).all()
