"""Network Dissection as an explainer method: thresholds, IoU tally, detectors, tally.csv.

Blocks stream their activations and the probe set's label maps chunk by chunk
(`netdissect.unit_thresholds`, `netdissect.IoUTally`). The label maps are decoded
once per layer grid before the blocks run (`decoded_labels`) and every block reads
them decoded, so the tally's cost does not grow with the number of unit blocks; a
block of any size reads the stored activation chunks it overlaps. Each block stores, besides
its result rows, its part of NetDissect-Lite's tally.csv with the pixel counts
(`truth`, `activation`, `intersect` per category), which are not part of
NetDissectResult; the layer's tally.csv is merged from those parts.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from neurodissect.v1 import common_pb2

from services.common import keys
from services.common.activations import iter_units
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.probe_format import ConceptTable
from services.common.result_store import covered, message_row
from services.common.spec_vocabulary import (
    DEFAULT_IOU_MODE,
    DETECTOR_IOU,
    IMAGE_PERCENTILE,
    IOU_MODES,
    NETDISSECT_EXEMPLARS,
    TOP_QUANTILE,
    IoUMode,
)
from services.common.store import ObjectStore
from services.explainer import decoded_labels, netdissect, per_image_iou
from services.explainer.explain_plan import ExplainPlan, check_choice, check_open_unit
from services.explainer.method_contract import ExplainMethod, Shared
from services.explainer.stage_runner import Stage
from services.explainer.unit_masks import count_decoded


@dataclass(frozen=True)
class NetDissectParams:
    """Threshold quantile, IoU denominator, detector IoU, exemplars per unit.

    `image_percentile`: the per_image mode's threshold of each raw map (percent).
    """

    top_quantile: float
    iou_mode: IoUMode
    detector_iou: float
    exemplars: int
    image_percentile: float


def top_quantile(spec: common_pb2.DissectionSpec) -> float:
    """`netdissect.top_quantile` of the spec, or its default."""
    p = spec.netdissect
    return p.top_quantile if p.HasField("top_quantile") else TOP_QUANTILE.default


def image_percentile(spec: common_pb2.DissectionSpec) -> float:
    """`netdissect.image_percentile` of the spec, or its default (the per_image mode's)."""
    p = spec.netdissect
    return p.image_percentile if p.HasField("image_percentile") else IMAGE_PERCENTILE.default


def netdissect_needed(spec: common_pb2.DissectionSpec, field: str) -> None:
    """InvalidArgument naming `field` unless the spec runs NetDissect, whose labels it checks."""
    if not spec.HasField(NetDissect.name):
        raise InvalidArgument("it checks NetDissect's labels: set netdissect as well", field)


def tally_part_key(job_id: str, layer: str, u0: int, u1: int) -> str:
    """Key of one block's rows of the tally (`results/J/layer4/netdissect/tally/u0-64.csv`).

    Not a result block (not `.json`); merged into the layer's tally.csv.
    """
    prefix = keys.results_prefix(job_id, layer, NetDissect.name)
    return f"{prefix}tally/{keys.span('u', u0, u1)}.csv"


def merge_tally_parts(store: ObjectStore, job_id: str, layer: str) -> str:
    """The layer's tally.csv from every stored block part: one header, rows by score descending.

    Ties keep unit order, as `netdissect.tally_csv` over the whole layer does.
    """
    header: list[str] = []
    rows: dict[int, list[str]] = {}
    prefix = tally_part_key(job_id, layer, 0, 0).rsplit("/", 1)[0] + "/"
    for key in store.list(prefix):
        if not key.endswith(".csv"):
            continue
        lines = list(csv.reader(io.StringIO(store.get(key).decode())))
        header = lines[0]
        rows.update({int(line[0]): line for line in lines[1:]})
    ordered = sorted(rows.values(), key=lambda line: (-float(line[3]), int(line[0])))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(ordered)
    return out.getvalue()


def layer_summary(rows: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Detectors, unique detector labels and detectors per category of the best label.

    `rows` are stored NetDissect rows (`{"unit", "label", "category", "detector", ...}`).
    """
    detectors = [r for r in rows.values() if r.get("detector", False)]
    return {
        "units": len(rows),
        "detectors": len(detectors),
        "unique_labels": len({r["label"] for r in detectors}),
        "detectors_per_category": dict(Counter(r["category"] for r in detectors)),
    }


def decoded_label_inputs(stage: Stage) -> Generator[str, None, Shared]:
    """The shared concept table and the layer grid's row bands, its decoded labels stored.

    What NetDissect's blocks and the checks that relabel its units (threshold sweep)
    read: (table ref, band starts).
    """
    yield "reading the concept table"
    table = stage.shared.table()
    band_start = decoded_labels.grid_bands(table, stage.plan.manifest.shape[2:])
    yield from decoded_labels.store_missing(
        stage.settings, stage.store, table, band_start, stage.is_active
    )
    return stage.shared.table_ref(), band_start


def require_stored(stage: Stage, why: str) -> None:
    """FailedPrecondition unless NetDissect stored every unit of the layer (`why` it is read)."""
    plan = stage.plan
    if not covered(stage.store, plan.job_id, plan.layer, NetDissect.name, plan.n_units):
        raise FailedPrecondition(
            f"NetDissect has not stored every unit of layer {plan.layer!r}: {why}"
            " (run netdissect first)",
            "methods",
        )


class NetDissect(ExplainMethod):
    """Network Dissection (Bau et al. 2017; NetDissect-Lite's figures and tally.csv)."""

    name = "netdissect"

    def params(self, spec: common_pb2.DissectionSpec) -> NetDissectParams:
        """NetDissectParams with defaults (quantile 0.005, `lite`, IoU 0.04, 15 exemplars, 50%)."""
        p = spec.netdissect
        if p.HasField("top_quantile"):
            check_open_unit(p.top_quantile, "spec.netdissect.top_quantile")
        check_choice(p.iou_mode, IOU_MODES, "spec.netdissect.iou_mode")
        if p.exemplars < 0:
            raise InvalidArgument(f"{p.exemplars} is negative", "spec.netdissect.exemplars")
        mode = next((m for m in IOU_MODES if m == p.iou_mode), DEFAULT_IOU_MODE)
        percentile = image_percentile(spec)
        if p.HasField("image_percentile") and mode != "per_image":
            raise InvalidArgument(
                "only the per_image mode reads it (set iou_mode 'per_image')",
                "spec.netdissect.image_percentile",
            )
        if not IMAGE_PERCENTILE.low <= percentile <= IMAGE_PERCENTILE.high:
            raise InvalidArgument(
                f"{percentile} is outside [0, 100]", "spec.netdissect.image_percentile"
            )
        return NetDissectParams(
            top_quantile=top_quantile(spec),
            iou_mode=mode,
            detector_iou=(
                p.detector_threshold if p.HasField("detector_threshold") else DETECTOR_IOU.default
            ),
            exemplars=NETDISSECT_EXEMPLARS.value(p.exemplars),
            image_percentile=percentile,
        )

    def prepare(self, stage: Stage, params: Any) -> Generator[str, None, Shared]:
        """The concept table, shared, and the label maps decoded for the layer's grid."""
        return (yield from decoded_label_inputs(stage))

    def block_rows(
        self,
        store: ObjectStore,
        plan: ExplainPlan,
        params: NetDissectParams,
        u0: int,
        u1: int,
        *shared: Any,
    ) -> list[dict[str, Any]]:
        """Thresholds, IoU tally, bests and exemplars of units [u0, u1); stores its tally part.

        Two streaming passes over the block's activations select the exact thresholds,
        a third tallies masks against the decoded label maps chunk by chunk.
        """
        table, band_start = shared
        if params.iou_mode == "per_image":
            return per_image_rows(store, plan, params, u0, u1, table, band_start)
        thresholds = block_unit_thresholds(store, plan, u0, u1, params.top_quantile)
        tally = netdissect.IoUTally(
            thresholds,
            table.label_categories(),
            len(table.categories),
            first_unit=u0,
            top_k=params.exemplars,
        )
        for i0, acts in iter_units(store, plan.manifest, u0, u1):
            labels = decoded_labels.read_decoded(store, table, band_start, i0, i0 + len(acts))
            tally.add(count_decoded(acts, labels, thresholds))
        dissections = netdissect.dissect(
            tally.result(), table, params.iou_mode, params.detector_iou
        )
        store.put(
            tally_part_key(plan.job_id, plan.layer, u0, u1),
            netdissect.tally_csv(dissections, table).encode(),
        )
        names = table.label_names()
        return [message_row(d.unit, result_message(d, names, table)) for d in dissections]

    def summary(
        self, stage: Stage, params: Any, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Detectors and unique detector labels of the layer (`layer_summary`)."""
        return layer_summary(rows)

    def exports(
        self, stage: Stage, params: Any, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, str]:
        """tally.csv with its pixel counts, merged from the blocks' parts."""
        plan = stage.plan
        return {"tally": merge_tally_parts(stage.store, plan.job_id, plan.layer)}


def block_unit_thresholds(
    store: ObjectStore, plan: ExplainPlan, u0: int, u1: int, top_quantile: float
) -> np.ndarray:
    """(u1-u0,) float32 exact NetDissect thresholds of units [u0, u1), from stored chunks.

    The chunks are read in their stored dtype: float16 ones need one pass, not two.
    """
    return netdissect.unit_thresholds(
        lambda: (acts for _, acts in iter_units(store, plan.manifest, u0, u1, as_stored=True)),
        top_quantile,
    )


def result_message(
    d: netdissect.UnitDissection, names: dict[int, str], table: ConceptTable
) -> common_pb2.NetDissectResult:
    """The stored NetDissectResult of one unit's dissection (`names`: label number -> name)."""
    return common_pb2.NetDissectResult(
        label=names[d.best.label],
        category=d.category,
        iou=d.best.iou,
        per_category=[
            common_pb2.CategoryBest(category=c, label=names[m.label], iou=m.iou)
            for c in table.categories
            if (m := d.per_category.get(c)) is not None
        ],
        threshold=d.threshold,
        detector=d.detector,
        exemplars=list(d.exemplars),
    )


def per_image_rows(
    store: ObjectStore,
    plan: ExplainPlan,
    params: NetDissectParams,
    u0: int,
    u1: int,
    table: ConceptTable,
    band_start: np.ndarray,
) -> list[dict[str, Any]]:
    """The per_image mode's rows of units [u0, u1) (`per_image_iou`); stores its tally part.

    One streaming pass: each chunk's maps are thresholded at their own percentiles and
    counted against the chunk's decoded labels (`band_start` of the layer's grid).
    """
    tally = per_image_iou.PerImageTally(
        u1 - u0, table.label_categories(), params.image_percentile, u0, params.exemplars
    )
    for i0, acts in iter_units(store, plan.manifest, u0, u1):
        tally.update(acts, decoded_labels.read_decoded(store, table, band_start, i0,
                                                       i0 + len(acts)))
    found = per_image_iou.dissect_per_image(tally.result(), table, params.detector_iou)
    store.put(
        tally_part_key(plan.job_id, plan.layer, u0, u1),
        netdissect.tally_csv([f.dissection for f in found], table).encode(),
    )
    names = table.label_names()
    categories = table.label_categories()
    rows = []
    for f in found:
        message = result_message(f.dissection, names, table)
        message.top_concepts.extend(
            common_pb2.CategoryBest(
                category=table.categories[categories[m.label]], label=names[m.label], iou=m.iou
            )
            for m in f.top_concepts
        )
        rows.append(message_row(f.dissection.unit, message))
    return rows
