"""Stored explanations turned into predictions of their units, for simulation scoring.

The simulator is a concept matrix over the test images, P_sim (n_test, C) with a
name per column: the probe set's label matrix, or CLIP similarities of the texts
the gateway had embedded (every label, formula leaf, linear term and caption the
methods produced). Each method's stored row for a unit is mapped to P_sim's
columns by name and predicted with `simulation`:

- netdissect, clip_dissect: the label's column; milan: the caption's column;
- compositional: the formula's leaves (negated leaves as 1 − P_sim), an empty
  formula a constant (it explains nothing: ρ = 0); a spatial formula's leaves alike
  (an expansion `label-X` is its label; WITH / CLOSE TO / CLOSE average their operands'
  leaves as AND and OR do, P_sim having no places within an image);
- linear: Σ w_i·P_sim[:, term_i] + bias.

A row whose concepts P_sim lacks, or no row at all, predicts NaN: the unit is
"missing" for that method and gets no score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.explainer import compositional, simulation, spatial_formulas


@dataclass(frozen=True)
class Simulator:
    """P_sim on the test images and the name of each column."""

    kind: str  # "labels" | "clip"
    names: list[str]  # (C,)
    matrix: np.ndarray  # (n_test, C) float32

    def columns(self) -> dict[str, int]:
        """Column of each name (the first, should a name repeat)."""
        out: dict[str, int] = {}
        for i, name in enumerate(self.names):
            out.setdefault(name, i)
        return out


def _signed_leaves(formula: compositional.Formula, negated: bool = False) -> list[tuple[int, bool]]:
    """(leaf, negated) pairs of a formula, left to right; NOT flips its operand's leaves."""
    if isinstance(formula, compositional.Leaf):
        return [(formula.label, negated)]
    if isinstance(formula, compositional.Not):
        return _signed_leaves(formula.operand, not negated)
    return _signed_leaves(formula.left, negated) + _signed_leaves(formula.right, negated)


def _signed_primitives(
    formula: spatial_formulas.Formula, negated: bool = False
) -> list[tuple[int, bool]]:
    """(label, negated) pairs of a spatial formula's primitives, left to right."""
    if isinstance(formula, spatial_formulas.Primitive):
        return [(formula.label, negated)]
    if isinstance(formula, spatial_formulas.Not):
        return _signed_primitives(formula.operand, not negated)
    if isinstance(formula, spatial_formulas.And | spatial_formulas.Or):
        operands: tuple[spatial_formulas.Formula, ...] = formula.operands
    else:
        operands = spatial_formulas.spatial_operands(formula)
    return [pair for operand in operands for pair in _signed_primitives(operand, negated)]


def predict_row(
    method: str, row: Mapping[str, Any], sim: Simulator, columns: Mapping[str, int]
) -> np.ndarray:
    """The (n_test,) float64 prediction of one stored row of `method` (NaN if unmappable)."""
    n = len(sim.matrix)
    missing = np.full(n, np.nan)
    if method in ("netdissect", "clip_dissect", "milan"):
        text = row.get("caption" if method == "milan" else "label", "")
        return simulation.predict_label(sim.matrix, columns[text]) if text in columns else missing
    if method == "linear":
        terms = row.get("terms", [])
        if any(t.get("concept", "") not in columns for t in terms):
            return missing
        return simulation.predict_linear(
            sim.matrix,
            [columns[t.get("concept", "")] for t in terms],
            [float(t.get("weight", 0.0)) for t in terms],
            float(row.get("bias", 0.0)),
        )
    formula = row.get("formula", "")
    if not formula:
        return np.zeros(n)
    try:
        leaves = _signed_leaves(compositional.parse_formula(formula, columns))
    except ValueError:
        try:
            leaves = _signed_primitives(spatial_formulas.parse_formula(formula, columns))
        except ValueError:
            return missing
    return simulation.predict_formula(sim.matrix, leaves)


def block_predictions(
    method: str, rows: Sequence[Mapping[str, Any] | None], sim: Simulator
) -> np.ndarray:
    """(n_test, B) predictions of a block's units from their rows (None: no row, NaN)."""
    columns = sim.columns()
    out = np.full((len(sim.matrix), len(rows)), np.nan)
    for k, row in enumerate(rows):
        if row is not None:
            out[:, k] = predict_row(method, row, sim, columns)
    return out
