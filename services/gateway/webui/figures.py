"""The pictures of a unit and of a layer, from stored data, as stored render digests.

A unit's exemplar is shown three times at `IMAGE_PX`: with the unit's mask (its raw
map resized with PIL's bilinear filter and thresholded at its NetDissect threshold),
with the segmentation of its NetDissect label, and with the mask of its
compositional formula, each where the unit has that answer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from neurodissect.v1 import common_pb2

from services.common.errors import NotFound
from services.common.probe_format import LabelChunk
from services.common.spec_vocabulary import COMPOSITIONAL_PRESETS, DETECTOR_IOU
from services.gateway.webui import masks, render
from services.gateway.webui.data import JobReader

log = logging.getLogger(__name__)

# Longer side of the exemplar images, in pixels, and exemplars shown per unit.
IMAGE_PX = 112
UNIT_EXEMPLARS = 8


@dataclass(frozen=True)
class Exemplar:
    """One exemplar image of a unit and the digests of its overlays ('' when not drawn)."""

    image_id: int
    unit: str
    concept: str
    formula: str


def unit_threshold(unit: common_pb2.UnitResult) -> float:
    """The unit's NetDissect activation threshold (+inf when NetDissect did not run)."""
    return unit.netdissect.threshold if unit.HasField("netdissect") else math.inf


def overlay_png(
    reader: JobReader, job: common_pb2.Job, unit: common_pb2.UnitResult, image_id: int,
    size: int = IMAGE_PX,
) -> tuple[bytes, np.ndarray]:
    """One image with the unit's mask overlaid: (PNG bytes, (H, W) bool mask).

    NotFound when the image's thumbnail is neither stored nor obtainable.
    """
    thumbnails = reader.thumbnails(job, [image_id], size)
    if image_id not in thumbnails:
        raise _missing_thumbnail(image_id)
    image = render.decode_rgb(thumbnails[image_id])
    raw = reader.unit_maps(job, unit.layer, unit.unit, [image_id])[image_id]
    mask = masks.unit_mask(raw, unit_threshold(unit), image.shape[:2])
    return render.png_bytes(render.highlight(image, mask, "unit")), mask


def _missing_thumbnail(image_id: int) -> NotFound:
    return NotFound(f"no stored thumbnail of image {image_id} (the extractor makes them)", "image")


def unit_exemplars(
    reader: JobReader, renders: render.Renders, job: common_pb2.Job,
    unit: common_pb2.UnitResult, count: int = UNIT_EXEMPLARS,
) -> list[Exemplar]:
    """The unit's top `count` exemplars (those with a thumbnail), their overlays stored.

    Missing stored inputs (activations, label maps, unreadable thumbnails) leave the
    exemplars out, logged: the rest of the page still shows.
    """
    image_ids = list(unit.netdissect.exemplars[:count])
    if not image_ids:
        return []
    try:
        thumbnails = reader.thumbnails(job, image_ids, IMAGE_PX)
        image_ids = [i for i in image_ids if i in thumbnails]
        maps = reader.unit_maps(job, unit.layer, unit.unit, image_ids)
        labels = reader.labels(job, image_ids)
        numbers = {c.name: c.number for c in reader.concepts(job).labels}
        return [
            _exemplar(renders, job, unit, image_id, render.decode_rgb(thumbnails[image_id]),
                      maps[image_id], labels[image_id], numbers)
            for image_id in image_ids
        ]
    except (NotFound, OSError) as exc:
        log.warning("job %s: no exemplars of %s unit %d: %s", job.id, unit.layer, unit.unit, exc)
        return []


def spatial_mode(params: common_pb2.CompositionalParams) -> bool:
    """Whether compositional explanations ran in the spatial mode (set, or by its preset)."""
    preset = COMPOSITIONAL_PRESETS.get(params.preset, {})
    return (params.mode or str(preset.get("mode", ""))) == "spatial"


def _exemplar(
    renders: render.Renders, job: common_pb2.Job, unit: common_pb2.UnitResult, image_id: int,
    image: np.ndarray, raw: np.ndarray, labels: LabelChunk, numbers: dict[str, int],
) -> Exemplar:
    """Draw (or find stored) one exemplar's overlays: `image` (H, W, 3), `raw` (h, w)."""
    size = image.shape[:2]
    threshold = unit_threshold(unit)

    def leaf(name: str) -> np.ndarray:
        wanted = {numbers[name]} if name in numbers else set()
        return masks.label_mask(labels.pixel, labels.image, wanted, size)

    def drawn(kind: str, mask: Callable[[], np.ndarray], *parts: object) -> str:
        return renders.png(
            [kind, job.dataset_key, image_id, IMAGE_PX, *parts],
            lambda: render.png_bytes(render.highlight(image, mask(), kind)),
        )

    unit_digest = drawn(
        "unit", lambda: masks.unit_mask(raw, threshold, size),
        job.acts_keys[unit.layer], unit.layer, unit.unit, threshold,
    )
    label = unit.netdissect.label if unit.HasField("netdissect") else ""
    formula = unit.compositional.formula if unit.HasField("compositional") else ""
    if spatial_mode(job.spec.compositional) or not masks.is_logical_formula(formula):
        formula = ""  # a spatial formula lives on the activation grid: no pixel mask
    concept = drawn("concept", lambda: leaf(label), label) if label else ""
    formula_digest = (
        drawn("formula", lambda: masks.formula_mask(formula, leaf), formula) if formula else ""
    )
    return Exemplar(image_id, unit_digest, concept, formula_digest)


def layer_plot(
    renders: render.Renders, job: common_pb2.Job, units: list[common_pb2.UnitResult]
) -> str:
    """The digest of the layer's plots (detectors per category, IoU, simulation ρ)."""
    params = job.spec.netdissect
    detector_iou = (
        params.detector_threshold if params.HasField("detector_threshold")
        else DETECTOR_IOU.default
    )
    sweep = next((list(s.sweep) for s in job.summary if s.layer == units[0].layer), [])
    parts, draw = render.layer_plot(units, detector_iou, sweep)
    return renders.png(parts, draw)


def unit_scatter(
    reader: JobReader, renders: render.Renders, job: common_pb2.Job, unit: common_pb2.UnitResult
) -> str:
    """The digest of the unit's simulation scatter plot; empty without a stored sample."""
    sample = reader.simulation_sample(job, unit.layer, unit.unit)
    if sample is None:
        return ""
    parts, draw = render.scatter_plot(
        unit, [str(m) for m in sample["methods"]], sample["actual"], sample["predicted"])
    return renders.png(parts, draw)
