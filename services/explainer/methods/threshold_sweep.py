"""The threshold sweep as an explainer method: NetDissect's labels at other thresholds.

Blocks re-run Network Dissection on the stored activations (no forward pass) at each
threshold of the sweep (`threshold_sweep`) and store, per unit, its best label at
each. The layer summary compares them with the labels NetDissect stored at the job's
own threshold: per threshold, detectors, unique labels and the unchanged fraction
(`LayerSummary.sweep`, the `sweep` export).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from neurodissect.v1 import common_pb2

from services.common.activations import iter_units
from services.common.errors import InvalidArgument
from services.common.result_store import read_rows, sweep_row
from services.common.spec_vocabulary import (
    MAX_SWEEP_POINTS,
    SWEEP_PERCENTILES,
    SWEEP_QUANTILES,
    DatasetIoUMode,
)
from services.common.store import ObjectStore
from services.explainer import decoded_labels, threshold_sweep
from services.explainer.explain_plan import ExplainPlan
from services.explainer.method_contract import ExplainMethod, Shared
from services.explainer.methods.netdissect import (
    NetDissect,
    decoded_label_inputs,
    netdissect_needed,
    require_stored,
)
from services.explainer.stage_runner import Stage


@dataclass(frozen=True)
class ThresholdSweepParams:
    """The thresholds swept and how NetDissect labels at each."""

    # Top quantiles, or per-image percentiles when `iou_mode` is None (the per_image mode).
    thresholds: tuple[float, ...]
    iou_mode: DatasetIoUMode | None
    detector_iou: float

    @property
    def kind(self) -> str:
        """What the thresholds are: NetDissect's field that each replaces."""
        return "image_percentile" if self.iou_mode is None else "top_quantile"


def swept(values: Sequence[float], default: Sequence[float], field: str, low: float,
          high: float, open_low: bool) -> tuple[float, ...]:
    """The given thresholds (or the default list), checked: bounded, at most 20, no repeats."""
    chosen = tuple(float(v) for v in values) or tuple(default)
    if len(chosen) > MAX_SWEEP_POINTS:
        raise InvalidArgument(f"{len(chosen)} thresholds; at most {MAX_SWEEP_POINTS}", field)
    if len(set(chosen)) != len(chosen):
        raise InvalidArgument("a threshold is listed twice", field)
    for i, v in enumerate(chosen):
        inside = (low < v if open_low else low <= v) and v < high
        if not (math.isfinite(v) and inside):
            bounds = f"{'(' if open_low else '['}{low:g}, {high:g})"
            raise InvalidArgument(f"{v} is outside {bounds}", f"{field}[{i}]")
    return chosen


class ThresholdSweep(ExplainMethod):
    """Threshold sensitivity (inner-detectors' `activ_thres.py`) of NetDissect's labels."""

    name = "threshold_sweep"

    def params(self, spec: common_pb2.DissectionSpec) -> ThresholdSweepParams:
        """Quantiles 0.001 … 0.05, or percentiles 0, 10, …, 90 in the per_image mode."""
        netdissect_needed(spec, "spec.threshold_sweep")
        nd = NetDissect().params(spec)
        p = spec.threshold_sweep
        if nd.iou_mode == "per_image":
            if p.quantiles:
                raise InvalidArgument(
                    "the per_image mode sweeps per-image percentiles: set percentiles",
                    "spec.threshold_sweep.quantiles",
                )
            thresholds = swept(p.percentiles, SWEEP_PERCENTILES,
                               "spec.threshold_sweep.percentiles", 0.0, 100.0, open_low=False)
            return ThresholdSweepParams(thresholds, None, nd.detector_iou)
        if p.percentiles:
            raise InvalidArgument(
                f"the {nd.iou_mode} mode sweeps dataset-wide quantiles: set quantiles",
                "spec.threshold_sweep.percentiles",
            )
        thresholds = swept(p.quantiles, SWEEP_QUANTILES, "spec.threshold_sweep.quantiles",
                           0.0, 1.0, open_low=True)
        return ThresholdSweepParams(thresholds, nd.iou_mode, nd.detector_iou)

    def prepare(self, stage: Stage, params: Any) -> Generator[str, None, Shared]:
        """The concept table, shared, and the decoded label maps (NetDissect's, stored)."""
        require_stored(stage, "the sweep compares with its labels")
        return (yield from decoded_label_inputs(stage))

    def block_rows(
        self,
        store: ObjectStore,
        plan: ExplainPlan,
        params: ThresholdSweepParams,
        u0: int,
        u1: int,
        *shared: Any,
    ) -> list[dict[str, Any]]:
        """Units [u0, u1) labelled at every threshold of the sweep."""
        table, band_start = shared
        labelled = (
            (acts, decoded_labels.read_decoded(store, table, band_start, i0, i0 + len(acts)))
            for i0, acts in iter_units(store, plan.manifest, u0, u1)
        )
        if params.iou_mode is None:
            found = threshold_sweep.percentile_sweep(
                labelled, params.thresholds, table, params.detector_iou
            )
        else:
            found = threshold_sweep.quantile_sweep(
                lambda: (
                    acts for _, acts in iter_units(store, plan.manifest, u0, u1, as_stored=True)
                ),
                labelled, params.thresholds, table, params.iou_mode, params.detector_iou,
            )
        names = table.label_names()
        return [
            sweep_row(u0 + k, [(s.threshold, names[s.label], s.iou, s.detector) for s in sweep])
            for k, sweep in enumerate(found)
        ]

    def summary(
        self, stage: Stage, params: ThresholdSweepParams, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, Any]:
        """`sweep`: per threshold, detectors, unique labels and the unchanged fraction."""
        plan = stage.plan
        default = {
            u: str(r.get("label", ""))
            for u, r in read_rows(stage.store, plan.job_id, plan.layer, NetDissect.name).items()
        }
        labels = {
            u: [(str(point["label"]), bool(point["detector"])) for point in row["sweep"]]
            for u, row in rows.items()
        }
        points = threshold_sweep.sweep_points(params.thresholds, labels, default)
        return {
            "units": len(rows),
            "sweep_kind": params.kind,
            "sweep": [
                {"threshold": p.threshold, "detectors": p.detectors,
                 "unique_labels": p.unique_labels, "unchanged_fraction": p.unchanged_fraction}
                for p in points
            ],
        }

    def exports(
        self, stage: Stage, params: ThresholdSweepParams, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, str]:
        """sweep.csv: `layer,kind,threshold,detectors,unique_labels,unchanged_fraction`."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            ["layer", "kind", "threshold", "detectors", "unique_labels", "unchanged_fraction"]
        )
        for point in self.summary(stage, params, rows)["sweep"]:
            writer.writerow([stage.plan.layer, params.kind, f"{point['threshold']:g}",
                             point["detectors"], point["unique_labels"],
                             f"{point['unchanged_fraction']:.6f}"])
        return {"sweep": out.getvalue()}
