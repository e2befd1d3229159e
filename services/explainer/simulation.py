"""Simulation scoring: how well each explanation predicts its unit on held-out images.

Spec: specs/linear.md, "Simulation scoring". Every method is scored the same way: its
explanation of a unit becomes a prediction for each test image from P_sim, the simulator's
(n_test, C) concept matrix (a CLIP concept matrix, possibly of another CLIP model than the
explainer's, or the label matrix), and the score is Pearson ρ with the unit's true pooled
activations on those images:

- a linear explanation predicts Σ w_i·P_sim[x, c_i] + b0 (`predict_linear`);
- a single label (NetDissect, CLIP-Dissect, a caption) predicts P_sim[x, label]
  (`predict_label`);
- a formula predicts the mean over its leaves of P_sim[x, leaf], or 1 − P_sim[x, leaf] for a
  negated leaf (`predict_formula`), which is "a formula's leaves" of the spec made concrete:
  it needs no pixel masks, so it works with CLIP simulators too.

Callers map each explanation's concepts to P_sim's columns; an explanation with a concept
P_sim lacks gets a NaN prediction and is counted as missing. Per layer and method, the
simulation method (`methods/simulation.py`) stores ρ per unit and the mean ρ with its
standard error over the scored units; dead units (constant activation on the test images)
and missing ones are counted apart, so they never make the mean NaN. Ablation scoring
(specs/verification.md) replaces the unit by the same predictions: `ablation.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.common.errors import InvalidArgument


def predict_linear(
    p_sim: np.ndarray, columns: Sequence[int], weights: Sequence[float], bias: float
) -> np.ndarray:
    """Σ_i weights[i]·P_sim[:, columns[i]] + bias: (n,) float64 from (n, C) P_sim."""
    chosen = np.asarray(p_sim[:, list(columns)], dtype=np.float64)
    return chosen @ np.asarray(weights, dtype=np.float64) + bias


def predict_label(p_sim: np.ndarray, column: int) -> np.ndarray:
    """P_sim[:, column]: (n,) float64."""
    return np.asarray(p_sim[:, column], dtype=np.float64)


def predict_formula(p_sim: np.ndarray, leaves: Sequence[tuple[int, bool]]) -> np.ndarray:
    """Mean over `leaves` (column, negated) of P_sim[:, column] or 1 − P_sim[:, column]: (n,)."""
    if not leaves:
        raise InvalidArgument("a formula has at least one leaf", field="leaves")
    total = np.zeros(len(p_sim))
    for column, negated in leaves:
        value = predict_label(p_sim, column)
        total += 1.0 - value if negated else value
    return total / len(leaves)


def unit_correlations(predictions: np.ndarray, activations: np.ndarray) -> np.ndarray:
    """Pearson ρ per unit between (n, U) predictions and (n, U) activations: (U,) float64.

    NaN for a dead unit (constant activation) and for a missing prediction (a column holding
    NaN); 0.0 for a constant prediction of a live unit, which explains nothing.
    """
    predictions = np.asarray(predictions, dtype=np.float64)
    activations = np.asarray(activations, dtype=np.float64)
    if predictions.shape != activations.shape or predictions.ndim != 2 or len(predictions) < 2:
        raise InvalidArgument(
            f"predictions {predictions.shape} and activations {activations.shape} must both "
            "be (n, units) with n ≥ 2",
            field="predictions",
        )
    x = predictions - predictions.mean(axis=0)
    y = activations - activations.mean(axis=0)
    flat = np.ptp(predictions, axis=0) == 0  # exact test: a computed std may not be 0
    denominator = np.sqrt((x * x).sum(axis=0) * (y * y).sum(axis=0))
    usable = ~flat & (denominator > 0)
    rho = np.divide((x * y).sum(axis=0), denominator, out=np.zeros(x.shape[1]), where=usable)
    rho = np.clip(rho, -1.0, 1.0)
    rho[dead_units(activations) | _missing(predictions)] = np.nan
    return rho


def dead_units(activations: np.ndarray) -> np.ndarray:
    """(U,) bool of (n, U) activations: the unit's activation is the same on every image."""
    return np.asarray(np.ptp(activations, axis=0) == 0)


def _missing(predictions: np.ndarray) -> np.ndarray:
    """(U,) bool: the unit's prediction column holds NaN."""
    return np.asarray(np.isnan(predictions).any(axis=0))
