"""The Ray task bodies: one call per unit block [u0, u1) of one layer and method.

Tasks receive the `Settings` (never a store object) and reopen the object store
from them, receive the `ExplainPlan`, and get the read-only inputs shared by all
blocks of a request as Ray object refs (`ray.put` once by the driver). A task that
owns a result block first looks whether the block is stored already, and writes it
whole at the end (`results_io.write_block`), so running it twice is harmless.

Memory is bounded by the block and one image chunk, never by the dataset: the
mask-based methods stream activations and label maps chunk by chunk
(`activations.iter_units`, `probe_format.read_label_chunk`); the others slice
their block's columns out of shared (N, ·) arrays that Ray maps without copying.

Every task returns a `BlockOutcome` that carries its attempt number, so the driver
counts Ray's retries.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from neurodissect.v1 import common_pb2

from services.common.activations import iter_units
from services.common.probe_format import ConceptTable, read_label_chunk
from services.common.settings import Settings
from services.explainer import (
    clip_dissect,
    compositional,
    linear,
    netdissect,
    results_io,
    simulation,
)
from services.explainer.explain_plan import ExplainPlan
from services.explainer.method_params import CompositionalSettings, NetDissectSettings
from services.explainer.sharding import BlockOutcome, attempt_number, block_task
from services.explainer.shared_inputs import LinearConcepts
from services.explainer.simulated_predictions import Simulator, block_predictions


@block_task
def clip_dissect_rows(
    similarity: str, pooled: np.ndarray, prepared: np.ndarray, u0: int, u1: int
) -> BlockOutcome:
    """CLIP-Dissect step 1 for units [u0, u1): their (u1 - u0, C) float32 rows.

    `pooled` is the layer's (N, U) pooled activations, `prepared` the (N, C)
    concept matrix of `clip_dissect.prepare_concepts`; both are shared objects.
    The rows come back in `BlockOutcome.value`; labels are chosen by the driver
    once every block of the layer is in (the WPMI marginal spans the layer).
    """
    rows = clip_dissect.unit_rows(similarity, pooled[:, u0:u1], prepared)
    return BlockOutcome(u0, u1, attempt_number(), computed=True, value=rows)


@block_task
def netdissect_block(
    settings: Settings,
    plan: ExplainPlan,
    table: ConceptTable,
    params: NetDissectSettings,
    u0: int,
    u1: int,
) -> BlockOutcome:
    """Network Dissection of units [u0, u1): thresholds, IoU tally, bests, exemplars.

    Two streaming passes over the block's activations select the exact thresholds,
    a third tallies masks against the label maps chunk by chunk. Stores the block's
    tally.csv rows (with pixel counts) first, then its result block.
    """
    store = settings.open_store()
    if results_io.block_stored(store, plan.job_id, plan.layer, "netdissect", u0, u1):
        return BlockOutcome(u0, u1, attempt_number(), computed=False)
    thresholds = netdissect.unit_thresholds(
        lambda: (acts for _, acts in iter_units(store, plan.manifest, u0, u1)),
        params.top_quantile,
    )
    tally = netdissect.IoUTally(
        thresholds,
        table.label_categories(),
        len(table.categories),
        first_unit=u0,
        top_k=params.exemplars,
    )
    for i0, acts in iter_units(store, plan.manifest, u0, u1):
        tally.update(acts, read_label_chunk(store, plan.dataset_key, i0, i0 + len(acts)))
    dissections = netdissect.dissect(tally.result(), table, params.iou_mode, params.detector_iou)
    store.put(
        results_io.tally_part_key(plan.job_id, plan.layer, u0, u1),
        netdissect.tally_csv(dissections, table).encode(),
    )
    names = table.label_names()
    rows = [
        results_io.message_row(d.unit, _netdissect_result(d, names, table)) for d in dissections
    ]
    results_io.write_block(store, plan.job_id, plan.layer, "netdissect", u0, u1, rows)
    return BlockOutcome(u0, u1, attempt_number(), computed=True)


def _netdissect_result(
    d: netdissect.UnitDissection, names: dict[int, str], table: ConceptTable
) -> common_pb2.NetDissectResult:
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


@block_task
def linear_block(
    settings: Settings,
    plan: ExplainPlan,
    concepts: LinearConcepts,
    moments: linear.ConceptMoments,
    pooled: np.ndarray,
    u0: int,
    u1: int,
) -> BlockOutcome:
    """Linear explanations of units [u0, u1), fitted together on the shared concept matrix.

    `concepts` holds the (N, C) matrix P, its names and the split; `moments` the
    train/val covariances of P; `pooled` the layer's (N, U) spatial means.
    """
    store = settings.open_store()
    if results_io.block_stored(store, plan.job_id, plan.layer, "linear", u0, u1):
        return BlockOutcome(u0, u1, attempt_number(), computed=False)
    fits = linear.fit_units(concepts.matrix, pooled[:, u0:u1], concepts.split, moments)
    rows = [
        results_io.message_row(u0 + k, _linear_result(fit, concepts))
        for k, fit in enumerate(fits)
    ]
    results_io.write_block(store, plan.job_id, plan.layer, "linear", u0, u1, rows)
    return BlockOutcome(u0, u1, attempt_number(), computed=True)


def _linear_result(
    fit: linear.LinearExplanation, concepts: LinearConcepts
) -> common_pb2.LinearResult:
    return common_pb2.LinearResult(
        explanation=fit.describe(concepts.names),
        terms=[
            common_pb2.LinearTerm(concept=concepts.names[c], weight=w)
            for c, w in zip(fit.concepts, fit.weights, strict=True)
        ],
        bias=fit.bias,
        val_corr=fit.val_correlation,
        concepts=concepts.kind,
    )


@block_task
def compositional_block(
    settings: Settings,
    plan: ExplainPlan,
    table: ConceptTable,
    dataset_sets: compositional.LabelSetTable,
    thresholds: np.ndarray,
    params: CompositionalSettings,
    u0: int,
    u1: int,
) -> BlockOutcome:
    """Compositional explanations of units [u0, u1): one beam search per unit.

    `thresholds` (U,) float32 holds Network Dissection's stored thresholds of the
    layer (NaN where there are none); the block computes its own when any is missing.
    `dataset_sets` counts every pixel of the probe set per label set (shared).
    """
    store = settings.open_store()
    if results_io.block_stored(store, plan.job_id, plan.layer, "compositional", u0, u1):
        return BlockOutcome(u0, u1, attempt_number(), computed=False)
    block_thresholds = thresholds[u0:u1]
    if not np.isfinite(block_thresholds).all():
        block_thresholds = netdissect.unit_thresholds(
            lambda: (acts for _, acts in iter_units(store, plan.manifest, u0, u1)),
            params.top_quantile,
        )
    label_categories = table.label_categories()
    units = compositional.UnitLabelSets(block_thresholds, label_categories)
    for i0, acts in iter_units(store, plan.manifest, u0, u1):
        units.update(acts, read_label_chunk(store, plan.dataset_key, i0, i0 + len(acts)))
    candidates = np.flatnonzero(label_categories >= 0)
    explanations = compositional.explain_units(
        units.tables(), dataset_sets, candidates[candidates > 0], params.search
    )
    names = table.label_names()
    rows = [
        results_io.message_row(
            u0 + k,
            common_pb2.CompositionalResult(
                formula=(
                    "" if e.formula is None else compositional.format_formula(e.formula, names)
                ),
                iou=e.iou,
                length=e.length,
            ),
        )
        for k, e in enumerate(explanations)
    ]
    results_io.write_block(store, plan.job_id, plan.layer, "compositional", u0, u1, rows)
    return BlockOutcome(u0, u1, attempt_number(), computed=True)


@block_task
def simulation_block(
    settings: Settings,
    plan: ExplainPlan,
    sim: Simulator,
    test_activations: np.ndarray,
    rows: dict[str, list[dict[str, Any] | None]],
    u0: int,
    u1: int,
) -> BlockOutcome:
    """Simulation scores of units [u0, u1): Pearson ρ per method on the test images.

    `sim` is P_sim on the test images, `test_activations` the layer's (n_test, U)
    pooled means there, `rows[method][k]` the stored explanation of unit u0 + k.
    A dead unit (constant on the test images) is stored with `dead` and NaN scores.
    """
    store = settings.open_store()
    if results_io.block_stored(store, plan.job_id, plan.layer, "simulation", u0, u1):
        return BlockOutcome(u0, u1, attempt_number(), computed=False)
    y = test_activations[:, u0:u1]
    dead = np.ptp(y, axis=0) == 0
    scores = {
        method: simulation.unit_correlations(block_predictions(method, method_rows, sim), y)
        for method, method_rows in rows.items()
    }
    out = []
    for k in range(u1 - u0):
        rhos = {
            m: float(rho[k])
            for m, rho in scores.items()
            if rows[m][k] is not None and (dead[k] or np.isfinite(rho[k]))
        }
        out.append(results_io.simulation_row(u0 + k, rhos, bool(dead[k])))
    results_io.write_block(store, plan.job_id, plan.layer, "simulation", u0, u1, out)
    return BlockOutcome(u0, u1, attempt_number(), computed=True)
