"""Detector significance as an explainer method: NetDissect's labels against random masks.

Runs after `netdissect` and reads its stored rows: each unit's best label and its
threshold (the per_image mode thresholds each image at its own percentile instead).
Step 1 runs on every block of the layer, not only the requested ones, because
Benjamini–Hochberg controls the false-discovery rate over every tested (unit, label)
pair of the layer: each task counts its units' grid masks against every label's
grid mask (`significance.GridOverlapTally`) and returns the counts. The layer's
p-values and the Benjamini–Hochberg cut-off are then shared with the block tasks,
which only write each unit's `SignificanceResult` for its NetDissect label.
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
from neurodissect.v1 import common_pb2

from services.common import keys
from services.common.activations import iter_units
from services.common.errors import InvalidArgument
from services.common.result_store import message_row, read_rows
from services.common.settings import Settings
from services.common.spec_vocabulary import MANUAL_FRACTION, PERMUTATIONS, SIGNIFICANCE_Q
from services.common.store import ObjectStore
from services.explainer import per_image_iou, significance, spatial_masks
from services.explainer.explain_plan import ExplainPlan
from services.explainer.method_contract import ExplainMethod, Shared
from services.explainer.methods.netdissect import NetDissect, netdissect_needed, require_stored
from services.explainer.sharding import BlockOutcome, attempt_number, block_task, gather
from services.explainer.stage_runner import Stage


@dataclass(frozen=True)
class SignificanceParams:
    """Benjamini–Hochberg rate, permutations of the check (0: none), the NetDissect mode."""

    q: float
    permutations: int
    # The per_image mode's percentile of each raw map; None: NetDissect's stored T_u.
    image_percentile: float | None


@dataclass(frozen=True)
class UnitTests:
    """(U,) arrays of the layer: each unit's NetDissect label tested against the null."""

    label: list[str]
    iou: np.ndarray  # grid IoU
    expected_iou: np.ndarray
    z: np.ndarray  # 0 where not tested
    p_value: np.ndarray  # 1 where not tested
    significant: np.ndarray  # bool
    permutation_p: np.ndarray  # NaN when not asked


def label_grids(stage: Stage, grid: spatial_masks.Grid) -> tuple[np.ndarray, np.ndarray]:
    """(L,) label numbers of the selected categories and their (L, N, W) uint64 grid masks.

    Downsampled by the manual fraction (specs/compositional_spatial.md), stored once per
    (dataset, grid, labels) under a content key and read back by every later job.
    """
    table = stage.shared.table()
    categories = table.label_categories()
    labels = np.array(sorted(c.number for c in table.labels if categories[c.number] >= 0))
    digest = keys.content_key(
        "label grid masks", grid.h, grid.w, "manual", MANUAL_FRACTION.default, labels.tolist()
    )
    key = keys.grid_masks(stage.plan.dataset_key, digest)
    if stage.store.exists(key):
        return labels, stage.store.get_arrays(key)["masks"]
    masks = np.concatenate(
        [
            spatial_masks.label_grid_masks(chunk.pixel, chunk.image, labels, grid)
            for chunk in stage.shared.label_chunks()
        ],
        axis=1,
    )
    stage.store.put_arrays(key, {"masks": masks}, compress=True)
    return labels, masks


@block_task
def overlap_block(
    settings: Settings,
    plan: ExplainPlan,
    params: SignificanceParams,
    label_masks: np.ndarray,
    thresholds: np.ndarray,
    tested_labels: np.ndarray,
    u0: int,
    u1: int,
) -> BlockOutcome:
    """Step 1 for units [u0, u1): their `significance.GridOverlap`, in `BlockOutcome.value`.

    `label_masks` (L, N, W) is shared; `thresholds` (u1 - u0,) float32 T_u (unused in
    the per_image mode); `tested_labels` (u1 - u0,) each unit's label row (-1: none).
    """
    store = settings.open_store()
    h, w = plan.manifest.shape[2:]
    tally = significance.GridOverlapTally(
        u1 - u0, label_masks, spatial_masks.Grid(h, w), u0, params.permutations
    )
    for i0, acts in iter_units(store, plan.manifest, u0, u1):
        cut = (
            thresholds[None, :]
            if params.image_percentile is None
            else per_image_iou.image_thresholds(acts, params.image_percentile)
        )
        tally.update(i0, acts > cut[:, :, None, None])
    return BlockOutcome(u0, u1, attempt_number(), computed=True, value=tally.result(tested_labels))


def tested_units(
    overlaps: list[significance.GridOverlap],
    label_area: np.ndarray,
    tested_labels: np.ndarray,
    names: list[str],
    q: float,
) -> UnitTests:
    """Each unit's tested label, with Benjamini–Hochberg over every pair of `overlaps`.

    `overlaps` cover the layer's units in order; `label_area` (L,) Σ_i l_i;
    `tested_labels` (U,) label rows (-1: none); `names` (U,) the labels' names.
    """
    p_all, rows = [], []
    for o in overlaps:
        z = significance.z_scores(o.intersection, o.expected, o.variance)
        p = significance.upper_p(z)
        p_all.append(p[o.variance > 0])
        k = tested_labels[o.first_unit : o.first_unit + len(o.mask_area)]
        units = np.arange(len(k))
        at = np.maximum(k, 0)
        x, e = o.intersection[units, at], o.expected[units, at]
        none = (k < 0) | np.isnan(z[units, at])
        rows.append((
            significance.grid_iou(x, o.mask_area, label_area[at]),
            significance.grid_iou(e, o.mask_area, label_area[at]),
            np.where(none, 0.0, np.nan_to_num(z[units, at])),
            np.where(k < 0, 1.0, p[units, at]),
            none,
            o.permutation_p,
        ))
    cutoff = significance.benjamini_hochberg(np.concatenate(p_all), q)
    iou, expected, z, p, none, permuted = (np.concatenate(a) for a in zip(*rows, strict=True))
    return UnitTests(
        label=names,
        iou=iou,
        expected_iou=expected,
        z=z,
        p_value=p,
        significant=~none.astype(bool) & (p <= cutoff),
        permutation_p=permuted,
    )


def significance_csv(layer: str, rows: Mapping[int, Mapping[str, Any]]) -> str:
    """The export: `layer,unit,label,iou,expected_iou,z,p_value,significant,permutation_p`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["label", "iou", "expected_iou", "z", "p_value", "significant", "permutation_p"]
    writer.writerow(["layer", "unit", *header])
    for unit in sorted(rows):
        r = rows[unit]
        writer.writerow([layer, unit, r.get("label", ""), *(
            f"{float(r.get(name, 0.0)):.6g}" for name in header[1:5]
        ), bool(r.get("significant", False)), f"{float(r.get('permutation_p', 0.0)):.6g}"])
    return out.getvalue()


class Significance(ExplainMethod):
    """Detector significance (specs/verification.md): z, p and Benjamini–Hochberg per unit."""

    name = "significance"

    def params(self, spec: common_pb2.DissectionSpec) -> SignificanceParams:
        """SignificanceParams with defaults (q 0.05, no permutations)."""
        netdissect_needed(spec, "spec.significance")
        p = spec.significance
        q = p.q if p.HasField("q") else SIGNIFICANCE_Q.default
        if not (math.isfinite(q) and 0.0 < q < 1.0):
            raise InvalidArgument(f"{q} is not strictly between 0 and 1", "spec.significance.q")
        if not 0 <= p.permutations <= PERMUTATIONS.high:
            raise InvalidArgument(
                f"{p.permutations} is outside [0, {PERMUTATIONS.high}] (0 = none)",
                "spec.significance.permutations",
            )
        nd = NetDissect().params(spec)
        return SignificanceParams(
            q=q,
            permutations=PERMUTATIONS.value(p.permutations),
            image_percentile=nd.image_percentile if nd.iou_mode == "per_image" else None,
        )

    def prepare(self, stage: Stage, params: SignificanceParams) -> Generator[str, None, Shared]:
        """Step 1 over every block of the layer, then the layer's tests, shared."""
        plan = stage.plan
        yield "reading Network Dissection's labels and thresholds"
        require_stored(stage, "significance tests its labels")
        stored = read_rows(stage.store, plan.job_id, plan.layer, NetDissect.name)
        h, w = plan.manifest.shape[2:]
        yield f"label masks on the {h}×{w} grid"
        labels, masks = label_grids(stage, spatial_masks.Grid(h, w))
        number = {(c.name, c.category): c.number for c in stage.shared.table().labels}
        names = [str(stored[u].get("label", "")) for u in range(plan.n_units)]
        wanted = np.array([
            number.get((names[u], str(stored[u].get("category", ""))), -1)
            for u in range(plan.n_units)
        ])
        at = np.searchsorted(labels, wanted).clip(0, max(len(labels) - 1, 0))
        tested = np.where((wanted >= 0) & (labels[at] == wanted), at, -1)
        thresholds = np.array(
            [float(stored[u].get("threshold", 0.0)) for u in range(plan.n_units)], np.float32
        )
        shared_masks = ray.put(masks)
        refs = [
            overlap_block.remote(stage.settings, plan, params, shared_masks, thresholds[u0:u1],
                                 tested[u0:u1], u0, u1)
            for u0, u1 in plan.layer_blocks()
        ]
        overlaps = []
        for outcome in gather(refs, stage.is_active):
            overlaps.append(outcome.value)
            yield f"grid overlaps of {sum(o.mask_area.size for o in overlaps)}/{plan.n_units} units"
        yield "Benjamini–Hochberg over every tested (unit, label) pair"
        overlaps.sort(key=lambda o: o.first_unit)
        label_area = spatial_masks.popcount(masks).sum(axis=1).astype(np.float64)
        return (ray.put(tested_units(overlaps, label_area, tested, names, params.q)),)

    def block_rows(
        self,
        store: ObjectStore,
        plan: ExplainPlan,
        params: SignificanceParams,
        u0: int,
        u1: int,
        *shared: Any,
    ) -> list[dict[str, Any]]:
        """The SignificanceResult of units [u0, u1) from the layer's tests."""
        (tests,) = shared
        return [
            message_row(u, common_pb2.SignificanceResult(
                label=tests.label[u],
                iou=float(tests.iou[u]),
                expected_iou=float(tests.expected_iou[u]),
                z=float(tests.z[u]),
                p_value=float(tests.p_value[u]),
                significant=bool(tests.significant[u]),
                permutation_p=float(np.nan_to_num(tests.permutation_p[u])),
            ))
            for u in range(u0, u1)
        ]

    def summary(
        self, stage: Stage, params: Any, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Significant detectors (NetDissect detectors whose label passes) and units.

        With permutations, `significant_not_permutation` counts the significant units
        whose permutation p is above q: their placement null is in doubt.
        """
        plan = stage.plan
        detectors = {
            u for u, r in read_rows(stage.store, plan.job_id, plan.layer, NetDissect.name).items()
            if r.get("detector", False)
        }
        significant = {u for u, r in rows.items() if r.get("significant", False)}
        summary = {
            "units": len(rows),
            "significant_detectors": len(significant & detectors),
            "significant_units": len(significant),
            "q": params.q,
        }
        if params.permutations:
            summary["significant_not_permutation"] = sum(
                float(rows[u].get("permutation_p", 0.0)) > params.q for u in significant
            )
        return summary

    def exports(
        self, stage: Stage, params: Any, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, str]:
        """significance.csv of every stored unit."""
        return {self.name: significance_csv(stage.plan.layer, rows)}
