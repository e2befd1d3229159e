"""Images of the pages, rendered once and stored under `keys.rendered(digest)`.

The digest is a content key of everything a picture is drawn from (the stored
inputs' own content keys, the unit, the image, the threshold, the plotted values
and `RENDER_VERSION`), so a page reads a picture straight from the store the second
time, and a changed input can never show a stale one.

- Exemplar overlays, as NetDissect shows them: the image keeps its colours where the
  mask is on and is dimmed toward `DIM_TINT` elsewhere, with the mask's outer edge
  drawn in the mask kind's colour (yellow: the unit; cyan: the NetDissect label;
  magenta: the compositional formula). Pixels inside the mask are the thumbnail's,
  unchanged.
- Per-layer plots (matplotlib): detectors per category, NetDissect IoU histogram,
  simulation ρ per method as distributions.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from neurodissect.v1 import common_pb2
from PIL import Image

from services.common import keys
from services.common.store import ObjectStore

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RENDER_VERSION = 3
DIM_TINT = np.array([24, 32, 64], dtype=np.float32)
DIM_KEEP = 0.3  # share of the image's own colour kept outside the mask
OUTLINES = {"unit": (255, 214, 0), "concept": (0, 200, 255), "formula": (255, 64, 160)}


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_rgb(png: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _outer_edge(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels outside `mask` that touch it (4-neighbourhood)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def highlight(image: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    """(H, W, 3) uint8 image, (H, W) bool mask -> (H, W, 3) uint8 overlay of `kind`'s colours."""
    dimmed = DIM_KEEP * image.astype(np.float32) + (1 - DIM_KEEP) * DIM_TINT
    out = np.where(mask[..., None], image, np.rint(dimmed).astype(np.uint8))
    out[_outer_edge(mask)] = OUTLINES[kind]
    return out


class Renders:
    """Pictures in the object store, drawn on first use: `digest = renders.png(parts, draw)`."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def png(self, parts: Sequence[Any], draw: Callable[[], bytes]) -> str:
        """The digest of the picture described by `parts`, drawing and storing it if needed."""
        digest = keys.content_key("render", RENDER_VERSION, *parts)
        key = keys.rendered(digest)
        if not self.store.exists(key):
            self.store.put(key, draw())
        return digest

    def get(self, digest: str) -> bytes:
        """The stored picture; NotFound if it was never drawn."""
        return self.store.get(keys.rendered(digest))


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib figure; matplotlib is imported on the first plot, not with the gateway."""
    import matplotlib

    matplotlib.use("Agg")  # no display: figures are drawn to PNG bytes only
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return buffer.getvalue()


def _scores(units: Sequence[common_pb2.UnitResult], field: str) -> dict[str, list[float]]:
    """Finite per-method scores of the units' `field` map (simulation ρ or ablation α)."""
    maps = [getattr(u, field) for u in units]
    methods = sorted({m for scores in maps for m in scores})
    values = {
        m: [round(s[m], 6) for s in maps if m in s and math.isfinite(s[m])] for m in methods
    }
    return {m: v for m, v in values.items() if v}


def _violins(axes: Any, scores: dict[str, list[float]], title: str, empty: str) -> None:
    if scores:
        axes.violinplot(list(scores.values()), showmeans=True)
        axes.set_xticks(range(1, len(scores) + 1), list(scores), rotation=20)
        axes.axhline(0.0, color="#999", linewidth=0.8)
    else:
        axes.text(0.5, 0.5, empty, ha="center", transform=axes.transAxes)
    axes.set_title(title)


def layer_plot(
    units: Sequence[common_pb2.UnitResult],
    detector_iou: float,
    sweep: Sequence[common_pb2.SweepPoint] = (),
) -> tuple[list[Any], Callable[[], bytes]]:
    """The plotted values of one layer and a function drawing them: (parts, draw).

    Panels: detectors per category (bars), NetDissect IoU of every unit (histogram,
    the detector threshold dashed), simulation ρ per method (violins with the mean);
    when present, ablation α per method (violins) and the threshold sweep (detectors
    and unique labels against the threshold, the share of unchanged labels).
    """
    categories = Counter(
        u.netdissect.category for u in units if u.HasField("netdissect") and u.netdissect.detector
    )
    ious = [round(u.netdissect.iou, 6) for u in units if u.HasField("netdissect")]
    rhos, alphas = _scores(units, "simulation"), _scores(units, "ablation")
    points = sorted(
        (p.threshold, p.detectors, p.unique_labels, round(p.unchanged_fraction, 6))
        for p in sweep
    )
    parts = ["layer", sorted(categories.items()), ious, sorted(rhos.items()), detector_iou,
             sorted(alphas.items()), points]

    def draw() -> bytes:
        panels = 3 + bool(alphas) + bool(points)
        figure = _new_figure((4 * panels, 3.2))
        bars, histogram, violins, *more = figure.subplots(1, panels)
        names = sorted(categories)
        bars.bar(names, [categories[n] for n in names], color="#4a78b5")
        bars.set_title("NetDissect detectors per category")
        bars.set_ylabel("units")
        if not names:
            bars.text(0.5, 0.5, "no detectors", ha="center", transform=bars.transAxes)
        histogram.hist(ious, bins=30, range=(0.0, max([*ious, detector_iou]) * 1.05 or 1.0),
                       color="#888")
        histogram.axvline(detector_iou, linestyle="--", color="#c33", label="detector IoU")
        histogram.set_title("NetDissect IoU of every unit")
        histogram.set_xlabel("IoU")
        histogram.legend(loc="upper right")
        _violins(violins, rhos, "simulation ρ per method (test split)", "no simulation scores")
        if alphas:
            _violins(more.pop(0), alphas, "ablation α per method (test split)", "")
        if points:
            axes = more.pop(0)
            thresholds = [p[0] for p in points]
            axes.plot(thresholds, [p[1] for p in points], "o-", label="detectors")
            axes.plot(thresholds, [p[2] for p in points], "s-", label="unique labels")
            if thresholds[0] > 0:  # quantiles span decades; percentiles start at 0
                axes.set_xscale("log")
            axes.set_xlabel("threshold")
            axes.set_title("threshold sweep")
            share = axes.twinx()
            share.plot(thresholds, [p[3] for p in points], "^--", color="#c33",
                       label="unchanged labels")
            share.set_ylim(0.0, 1.05)
            share.set_ylabel("share of units, label unchanged")
            axes.legend(loc="upper left", fontsize="small")
        return _figure_png(figure)

    return parts, draw


def scatter_plot(
    unit: common_pb2.UnitResult, methods: Sequence[str], actual: np.ndarray,
    predicted: np.ndarray,
) -> tuple[list[Any], Callable[[], bytes]]:
    """One unit's simulation scatter: each method's prediction against the actual activation.

    `actual` (S,) are the unit's pooled means on sampled test images, `predicted` (M, S)
    each method's prediction there (NaN where it has none). Methods predict on their own
    scales (a label's 0/1, a linear sum, a cosine), so each is z-scored: Pearson ρ, the
    score shown beside it, does not change. One axes for all methods: a unit page's plot
    costs a tenth of a second, and the REPORTING stage draws one per unit.
    Returns (parts, draw) as `layer_plot`.
    """
    shown = []
    for method, values in zip(methods, predicted, strict=True):
        finite = np.isfinite(values)
        if finite.any() and values[finite].std() > 0:
            z = (values - values[finite].mean()) / values[finite].std()
            shown.append((method, np.where(finite, z, np.nan).round(4)))
    parts = ["scatter", unit.layer, unit.unit, actual.round(6).tolist(),
             [(m, z.tolist()) for m, z in shown]]

    def draw() -> bytes:
        figure = _new_figure((5.2, 3.2))
        axes = figure.add_axes((0.11, 0.15, 0.5, 0.77))
        for method, z in shown:
            rho = unit.simulation.get(method, math.nan)
            label = f"{method} ρ {rho:.3f}" if math.isfinite(rho) else method
            axes.plot(z, actual, ".", markersize=4, alpha=0.6, label=label)
        if shown:
            axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                        frameon=False)
        else:
            axes.text(0.5, 0.5, "no varying predictions", ha="center",
                      transform=axes.transAxes)
        axes.set_xlabel("prediction (z-scored per method)")
        axes.set_ylabel("actual (pooled mean)")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80)
        return buffer.getvalue()

    return parts, draw
