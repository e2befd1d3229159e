"""Occlusion verification's figures (specs/verification.md) from the extractor's stored changes.

The extractor stores δ_u(c) per unit u and occluded concept c: the relative change
of u's spatially averaged activation when c's regions are hidden (NaN: u is silent
on every image of c's regions). A drop is −δ. Here:

- per concept, Pearson(−δ_u(c), IoU(u, c)) across the units with a δ
  (`concept_correlations`): units that match c by IoU should lose more;
- per unit, the concept whose occlusion drops it most and its five largest drops
  (`unit_drops`);
- per layer, the fraction of detectors whose own label's occlusion drops them by at
  least the threshold (`detectors_dropping`).
"""

from __future__ import annotations

import numpy as np

TOP_DROPS = 5
MIN_UNITS = 3  # a correlation over fewer units is not reported


def concept_correlations(drops: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """(C,) Pearson ρ of (U, C) drops and (U, C) IoU per concept over units with a drop.

    NaN where fewer than MIN_UNITS units have a drop or either side is constant.
    """
    out = np.full(drops.shape[1], np.nan)
    for c in range(drops.shape[1]):
        live = np.isfinite(drops[:, c])
        x, y = drops[live, c].astype(np.float64), iou[live, c].astype(np.float64)
        if len(x) < MIN_UNITS or np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        x, y = x - x.mean(), y - y.mean()
        out[c] = float(np.clip((x @ y) / np.sqrt((x @ x) * (y @ y)), -1.0, 1.0))
    return out


def unit_drops(drops: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per unit of (U, C) drops its largest finite drops, best first: [(concept, drop)] ≤ 5.

    Ties keep the lower concept index.
    """
    out = []
    for row in drops:
        live = np.flatnonzero(np.isfinite(row))
        order = live[np.argsort(-row[live], kind="stable")][:TOP_DROPS]
        out.append([(int(c), float(row[c])) for c in order])
    return out


def detectors_dropping(own_drops: np.ndarray, threshold: float) -> tuple[int, float]:
    """(detectors tested, fraction with drop ≥ threshold) of (D,) own-label drops.

    NaN drops are detectors whose label was not occluded: not tested.
    """
    tested = own_drops[np.isfinite(own_drops)]
    if len(tested) == 0:
        return 0, float("nan")
    return len(tested), float(np.mean(tested >= threshold))
