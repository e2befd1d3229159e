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
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: figures are drawn to PNG bytes only

import numpy as np
from matplotlib.figure import Figure
from neurodissect.v1 import common_pb2
from PIL import Image

from services.common import keys
from services.common.store import ObjectStore

RENDER_VERSION = 1
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


def _figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return buffer.getvalue()


def layer_plot(
    units: Sequence[common_pb2.UnitResult], detector_iou: float
) -> tuple[list[Any], Callable[[], bytes]]:
    """The plotted values of one layer and a function drawing them: (parts, draw).

    Panels: detectors per category (bars), NetDissect IoU of every unit (histogram,
    the detector threshold dashed), simulation ρ per method (violins with the mean).
    """
    categories = Counter(
        u.netdissect.category for u in units if u.HasField("netdissect") and u.netdissect.detector
    )
    ious = [round(u.netdissect.iou, 6) for u in units if u.HasField("netdissect")]
    methods = sorted({m for u in units for m in u.simulation})
    rhos = {
        m: [round(u.simulation[m], 6) for u in units
            if m in u.simulation and math.isfinite(u.simulation[m])]
        for m in methods
    }
    rhos = {m: values for m, values in rhos.items() if values}
    parts = ["layer", sorted(categories.items()), ious, sorted(rhos.items()), detector_iou]

    def draw() -> bytes:
        figure = Figure(figsize=(12, 3.2))
        bars, histogram, violins = figure.subplots(1, 3)
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
        if rhos:
            violins.violinplot(list(rhos.values()), showmeans=True)
            violins.set_xticks(range(1, len(rhos) + 1), list(rhos), rotation=20)
            violins.axhline(0.0, color="#999", linewidth=0.8)
        else:
            violins.text(0.5, 0.5, "no simulation scores", ha="center",
                         transform=violins.transAxes)
        violins.set_title("simulation ρ per method (test split)")
        return _figure_png(figure)

    return parts, draw
