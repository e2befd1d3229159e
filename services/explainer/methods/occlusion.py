"""Occlusion verification as an explainer method: stored drops against NetDissect's IoU.

Runs after the extractor's Occlude step (its key comes in the request's
`occlusion_key`) and after NetDissect on the layer (its stored labels and
thresholds). Each block tallies IoU(u, c) of its units with every occluded concept
at NetDissect's stored thresholds and IoU denominator (the per_image mode's units
are thresholded at the top quantile and scored with `lite`, the dataset-wide IoU
a correlation across units needs), stores that (B, C) part beside its rows, and
writes one OcclusionResult per unit. The layer summary correlates −δ with IoU per
concept over all units, and counts the detectors whose own label's occlusion
drops them by at least `drop_threshold`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from google.protobuf import json_format
from neurodissect.v1 import common_pb2

from services.common import keys
from services.common.activations import iter_units
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.probe_format import ConceptTable, read_label_chunk
from services.common.result_store import message_row, read_rows
from services.common.spec_vocabulary import (
    DATASET_IOU_MODES,
    DEFAULT_OCCLUSION_FILL,
    DROP_THRESHOLD,
    MAX_REGIONS,
    MAX_SEED,
    OCCLUSION_FILLS,
    OCCLUSION_METHOD,
    DatasetIoUMode,
    OcclusionFill,
)
from services.common.store import ObjectStore
from services.explainer import netdissect, occlusion
from services.explainer.explain_plan import ExplainPlan, check_choice
from services.explainer.method_contract import ExplainMethod, Shared
from services.explainer.methods.netdissect import NetDissect, block_unit_thresholds
from services.explainer.stage_runner import Stage

BLACK_FILL_NOTE = (
    "black fill: a unit whose own colour is near black (the toy world's black is "
    "(20, 20, 20)) still half-matches the fill, drops less than the others and rises where "
    "other regions turn black; judge it with the mean fill"
)


@dataclass(frozen=True)
class OcclusionParams:
    """Fill, sampling and the drop threshold; NetDissect's thresholds and IoU mode."""

    fill: OcclusionFill
    max_regions: int
    seed: int
    drop_threshold: float
    top_quantile: float
    iou_mode: DatasetIoUMode
    stored_thresholds: bool  # NetDissect's thresholds are the top quantile's


@dataclass(frozen=True)
class StoredChanges:
    """What the extractor stored for a layer: concepts, δ, regions and cost."""

    labels: np.ndarray  # (C,) int32 label numbers
    delta: np.ndarray  # (U, C) float32, NaN: no δ
    regions: np.ndarray  # (C,) int64
    forward_passes: int
    seconds: float


def read_changes(store: ObjectStore, key: str) -> StoredChanges:
    """The extractor's stored changes; NotFound naming `occlusion_key` when absent."""
    if not key or not store.exists(key):
        raise NotFound(f"no stored occlusion changes {key!r} (run Occlude first)",
                       "occlusion_key")
    arrays = store.get_arrays(key)
    forward_passes, seconds = arrays["cost"]
    return StoredChanges(arrays["labels"], arrays["delta"], arrays["regions"],
                         int(forward_passes), float(seconds))


def iou_part_key(job_id: str, layer: str, u0: int, u1: int) -> str:
    """Key of one block's (B, C) IoU with the occluded concepts (not a result block)."""
    prefix = keys.results_prefix(job_id, layer, OCCLUSION_METHOD)
    return f"{prefix}iou/{keys.span('u', u0, u1)}.npy"


def layer_iou(store: ObjectStore, plan: ExplainPlan, n_concepts: int) -> np.ndarray:
    """(U, C) IoU of every unit of the layer, from the blocks' stored parts (NaN: none)."""
    out = np.full((plan.n_units, n_concepts), np.nan)
    for u0, u1 in plan.layer_blocks():
        key = iou_part_key(plan.job_id, plan.layer, u0, u1)
        if store.exists(key):
            out[u0:u1] = store.get_array(key)
    return out


class Occlusion(ExplainMethod):
    """Occlusion verification (inner-detectors' verifier): drops against IoU."""

    name = OCCLUSION_METHOD

    def params(self, spec: common_pb2.DissectionSpec) -> OcclusionParams:
        """OcclusionParams with defaults (black, 2000 regions, seed 0, drop 0.1)."""
        p = spec.occlusion
        check_choice(p.fill, OCCLUSION_FILLS, "spec.occlusion.fill")
        if not 0 <= p.max_regions <= MAX_REGIONS.high:
            raise InvalidArgument(f"{p.max_regions} is outside [0, {MAX_REGIONS.high}]",
                                  "spec.occlusion.max_regions")
        if not 0 <= p.seed <= MAX_SEED:
            raise InvalidArgument(f"{p.seed} is outside [0, {MAX_SEED}]", "spec.occlusion.seed")
        drop = p.drop_threshold if p.HasField("drop_threshold") else DROP_THRESHOLD.default
        if not (math.isfinite(drop) and DROP_THRESHOLD.low <= drop <= DROP_THRESHOLD.high):
            raise InvalidArgument(f"{drop} is outside [0, 1]", "spec.occlusion.drop_threshold")
        nd = NetDissect().params(spec)
        mode: DatasetIoUMode = next((m for m in DATASET_IOU_MODES if m == nd.iou_mode), "lite")
        return OcclusionParams(
            fill=next((f for f in OCCLUSION_FILLS if f == p.fill), DEFAULT_OCCLUSION_FILL),
            max_regions=MAX_REGIONS.value(p.max_regions),
            seed=p.seed,
            drop_threshold=drop,
            top_quantile=nd.top_quantile,
            iou_mode=mode,
            stored_thresholds=nd.iou_mode in DATASET_IOU_MODES,
        )

    def prepare(self, stage: Stage, params: OcclusionParams) -> Generator[str, None, Shared]:
        """The stored changes, the concept table, NetDissect's labels and thresholds."""
        plan = stage.plan
        yield "reading the extractor's occlusion changes"
        changes = read_changes(stage.store, plan.occlusion_key)
        yield "reading Network Dissection's labels"
        rows = read_rows(stage.store, plan.job_id, plan.layer, NetDissect.name)
        if len(rows) < plan.n_units:
            raise FailedPrecondition(
                f"occlusion needs Network Dissection's results of every unit of layer "
                f"{plan.layer!r} (run netdissect first)", "methods"
            )
        thresholds = np.array([rows[u].get("threshold", 0.0) for u in range(plan.n_units)],
                              dtype=np.float32)
        labels = [str(rows[u].get("label", "")) for u in range(plan.n_units)]
        return stage.shared.table_ref(), ray.put(changes), ray.put((thresholds, labels))

    def block_rows(
        self,
        store: ObjectStore,
        plan: ExplainPlan,
        params: OcclusionParams,
        u0: int,
        u1: int,
        *shared: Any,
    ) -> list[dict[str, Any]]:
        """IoU of units [u0, u1) with the occluded concepts (stored), and their answers."""
        table: ConceptTable
        changes: StoredChanges
        table, changes, (thresholds, labels) = shared
        block_thresholds = thresholds[u0:u1]
        if not params.stored_thresholds:
            block_thresholds = block_unit_thresholds(store, plan, u0, u1, params.top_quantile)
        tally = netdissect.IoUTally(
            block_thresholds, table.label_categories(), len(table.categories), first_unit=u0,
            top_k=1,
        )
        for i0, acts in iter_units(store, plan.manifest, u0, u1):
            tally.update(acts, read_label_chunk(store, plan.dataset_key, i0, i0 + len(acts)))
        iou = netdissect.iou(tally.result(), table.label_categories(), params.iou_mode)
        store.put_array(iou_part_key(plan.job_id, plan.layer, u0, u1), iou[:, changes.labels])
        names = table.label_names()
        concepts = [names[int(n)] for n in changes.labels]
        drops = -changes.delta[u0:u1].astype(np.float64)
        rows = []
        for k, best in enumerate(occlusion.unit_drops(drops)):
            own_label = labels[u0 + k]
            own = concepts.index(own_label) if own_label in concepts else -1
            top = concepts[best[0][0]] if best else ""
            rows.append(message_row(u0 + k, common_pb2.OcclusionResult(
                top_concept=top,
                top_drop=best[0][1] if best else math.nan,
                matches_netdissect=bool(top) and top == own_label,
                own_drop=float(drops[k, own]) if own >= 0 else math.nan,
                drops=[common_pb2.ConceptScore(concept=concepts[c], score=d) for c, d in best],
            )))
        return rows

    def summary(
        self, stage: Stage, params: OcclusionParams, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, Any]:
        """The layer's OcclusionSummary: correlations per concept, detectors dropping, cost."""
        plan = stage.plan
        changes = read_changes(stage.store, plan.occlusion_key)
        names = stage.shared.table().label_names()
        concepts = [names[int(n)] for n in changes.labels]
        drops = -changes.delta.astype(np.float64)
        correlation = occlusion.concept_correlations(drops, layer_iou(stage.store, plan,
                                                                      len(concepts)))
        detector_rows = read_rows(stage.store, plan.job_id, plan.layer, NetDissect.name)
        own = np.array([
            float(row.get("own_drop", math.nan))
            for unit, row in rows.items() if detector_rows.get(unit, {}).get("detector")
        ], dtype=np.float64)
        tested, dropping = occlusion.detectors_dropping(own, params.drop_threshold)
        finite = {c: float(r) for c, r in zip(concepts, correlation, strict=True)
                  if np.isfinite(r)}
        summary = common_pb2.OcclusionSummary(
            fill=params.fill,
            concepts=len(concepts),
            regions=int(changes.regions.sum()),
            mean_correlation=float(np.mean(list(finite.values()))) if finite else math.nan,
            correlation=finite,
            concept_regions={c: int(n) for c, n in zip(concepts, changes.regions, strict=True)},
            detectors_tested=tested,
            detectors_dropping=dropping,
            forward_passes=changes.forward_passes,
            seconds=changes.seconds,
            note=BLACK_FILL_NOTE if params.fill == "black" else "",
        )
        figures = json_format.MessageToDict(summary, preserving_proto_field_name=True)
        return {"units": len(rows), OCCLUSION_METHOD: figures}

    def exports(
        self, stage: Stage, params: OcclusionParams, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, str]:
        """occlusion.csv: per unit its most-dropping concept, own label's drop, match."""
        labels = read_rows(stage.store, stage.plan.job_id, stage.plan.layer, NetDissect.name)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["unit", "netdissect_label", "own_drop", "top_concept", "top_drop",
                         "matches_netdissect"])
        for unit in sorted(rows):
            row = rows[unit]
            writer.writerow([
                unit, labels.get(unit, {}).get("label", ""),
                f"{float(row.get('own_drop', math.nan)):.6g}", row.get("top_concept", ""),
                f"{float(row.get('top_drop', math.nan)):.6g}",
                bool(row.get("matches_netdissect", False)),
            ])
        return {OCCLUSION_METHOD: out.getvalue()}
