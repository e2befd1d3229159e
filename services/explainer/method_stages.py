"""One stage per method over one layer: shared inputs, block tasks, layer-wide steps.

A stage puts the read-only inputs its blocks share into Ray once (`SharedInputs`),
submits one task per requested unit block that is not stored yet, yields an
`ExplainProgress` per finished block, and ends with the steps that need the whole
layer (CLIP-Dissect's labels, summaries, exports). The method math lives in the
method modules; this module only moves arrays between the store, Ray and them.

Per-layer outputs besides the result blocks:
- `results/{job}/{layer}/netdissect/summary.json`: detectors and unique detector
  labels, in all and per category, over every unit stored so far;
- `results/{job}/{layer}/netdissect/tally.csv`: NetDissect-Lite's tally, merged from
  the blocks' parts under `netdissect/tally/`;
- `results/{job}/{layer}/simulation/summary.json`: mean ρ ± standard error per
  method, dead units, the simulator used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
from neurodissect.v1 import common_pb2
from neurodissect.v1.explainer_pb2 import ExplainProgress as Progress

from services.common import keys
from services.common.metrics import UNITS_EXPLAINED
from services.common.settings import Settings
from services.common.store import ObjectStore
from services.explainer import block_tasks, clip_dissect, compositional, linear, results_io
from services.explainer.explain_plan import ExplainPlan
from services.explainer.method_params import (
    clip_dissect_settings,
    compositional_settings,
    linear_settings,
    netdissect_settings,
)
from services.explainer.sharding import gather
from services.explainer.shared_inputs import SharedInputs
from services.explainer.simulated_predictions import SCORED_METHODS


@dataclass
class Stage:
    """What every stage needs: settings for the tasks, the store, the plan, a liveness check."""

    settings: Settings
    store: ObjectStore
    plan: ExplainPlan
    is_active: Callable[[], bool]
    shared: SharedInputs

    def missing(self, method: str) -> list[tuple[int, int]]:
        """Requested blocks of `method` that are not stored yet."""
        p = self.plan
        return [
            (u0, u1)
            for u0, u1 in p.blocks()
            if not results_io.block_stored(self.store, p.job_id, p.layer, method, u0, u1)
        ]

    def progress(self, method: str, done: int, message: str = "") -> Progress:
        """An ExplainProgress of `method` with `done` of the requested units finished."""
        return Progress(
            method=method, units_done=done, units_total=self.plan.units_total, message=message
        )

    def stored(self, method: str) -> Progress:
        """The progress message of a method whose requested blocks are all stored."""
        return self.progress(method, self.plan.units_total, "already stored")

    def run_blocks(
        self, method: str, missing: list[tuple[int, int]], submit: Callable[[int, int], Any]
    ) -> Iterator[Progress]:
        """Submit `submit(u0, u1)` for each missing block; yield progress as blocks finish."""
        done = self.plan.units_total - sum(u1 - u0 for u0, u1 in missing)
        refs = [submit(u0, u1) for u0, u1 in missing]
        for outcome in gather(refs, self.is_active):
            done += outcome.units
            if outcome.computed:
                UNITS_EXPLAINED.labels(method).inc(outcome.units)
            yield self.progress(method, done, f"units {outcome.u0}-{outcome.u1}")


# -- Network Dissection -----------------------------------------------------------------------


def netdissect_stage(stage: Stage) -> Iterator[Progress]:
    """Network Dissection of every requested block, then the layer's summary and tally.csv."""
    plan, params = stage.plan, netdissect_settings(stage.plan.spec)
    missing = stage.missing("netdissect")
    if not missing:
        yield stage.stored("netdissect")
    else:
        table = stage.shared.table_ref()
        yield from stage.run_blocks(
            "netdissect",
            missing,
            lambda u0, u1: block_tasks.netdissect_block.remote(
                stage.settings, plan, table, params, u0, u1
            ),
        )
    rows = results_io.read_rows(stage.store, plan.job_id, plan.layer, "netdissect")
    summary = {
        **netdissect_summary(rows.values(), stage.shared.table().categories),
        "layer_units": plan.n_units,
        "settings": asdict(params),
    }
    stage.store.put_json(keys.result_summary(plan.job_id, plan.layer, "netdissect"), summary)
    stage.store.put(
        results_io.export_key(plan.job_id, plan.layer, "netdissect", "tally.csv"),
        results_io.merge_tally_parts(stage.store, plan.job_id, plan.layer).encode(),
    )


def netdissect_summary(rows: Iterable[Mapping[str, Any]], categories: list[str]) -> dict[str, Any]:
    """Detectors and unique detector labels, in all and per category of the best label.

    `rows` are stored NetDissect rows (`{"unit", "label", "category", "detector", ...}`).
    """
    rows = list(rows)
    detectors = [r for r in rows if r.get("detector", False)]
    return {
        "units": len(rows),
        "detectors": len(detectors),
        "unique_labels": len({(r["category"], r["label"]) for r in detectors}),
        "detectors_per_category": {
            c: sum(r["category"] == c for r in detectors) for c in categories
        },
        "unique_labels_per_category": {
            c: len({r["label"] for r in detectors if r["category"] == c}) for c in categories
        },
    }


# -- compositional explanations ---------------------------------------------------------------


def compositional_stage(stage: Stage) -> Iterator[Progress]:
    """Beam search per unit block, on Network Dissection's thresholds when the job has them.

    The job's stored NetDissect thresholds are used when its spec runs netdissect
    with the same quantile; blocks without them compute their own (the same values:
    both are the exact quantile).
    """
    plan, method = stage.plan, "compositional"
    missing = stage.missing(method)
    if not missing:
        yield stage.stored(method)
        return
    params = compositional_settings(plan.spec)
    thresholds = np.full(plan.n_units, np.nan, dtype=np.float32)
    if (
        plan.spec.HasField("netdissect")
        and netdissect_settings(plan.spec).top_quantile == params.top_quantile
    ):
        for unit, row in results_io.read_rows(
            stage.store, plan.job_id, plan.layer, "netdissect"
        ).items():
            thresholds[unit] = row.get("threshold", 0.0)
    table = stage.shared.table()
    dataset_sets = ray.put(
        compositional.dataset_label_sets(stage.shared.label_chunks(), table.label_categories())
    )
    shared = (stage.shared.table_ref(), dataset_sets, ray.put(thresholds))
    yield from stage.run_blocks(
        method,
        missing,
        lambda u0, u1: block_tasks.compositional_block.remote(
            stage.settings, plan, *shared, params, u0, u1
        ),
    )


# -- CLIP-Dissect ---------------------------------------------------------------------------


def clip_dissect_stage(stage: Stage) -> Iterator[Progress]:
    """CLIP-Dissect over the whole layer; labels stored for the requested blocks.

    Step 1 runs on every block of the layer (not only the requested ones): the
    soft-WPMI marginal is taken over all units of the layer, so the labels of a unit
    depend neither on the block size nor on how a layer is split across requests.
    """
    plan, method = stage.plan, "clip_dissect"
    missing = stage.missing(method)
    if not missing:
        yield stage.stored(method)
        return
    done = plan.units_total - sum(u1 - u0 for u0, u1 in missing)
    params = clip_dissect_settings(plan.spec)
    names, similarity = stage.shared.clip_similarity(plan.clip_dissect)
    # S is this stage's own fresh array: P̃ may be written over it (no second (N, C) array)
    prepared = ray.put(clip_dissect.prepare_concepts(params.similarity, similarity, overwrite=True))
    del similarity
    pooled = stage.shared.pooled_ref(params.pooling)
    refs = [
        block_tasks.clip_dissect_rows.remote(params.similarity, pooled, prepared, u0, u1)
        for u0, u1 in plan.layer_blocks()
    ]
    rows = np.empty((plan.n_units, len(names)), dtype=np.float32)
    scored = 0
    for outcome in gather(refs, stage.is_active):
        rows[outcome.u0 : outcome.u1] = outcome.value
        scored += outcome.units
        yield stage.progress(method, done, f"concept scores of {scored}/{plan.n_units} units")
    layer_similarity = clip_dissect.layer_similarity(params.similarity, rows)
    ranking = clip_dissect.layer_ranking(params.similarity, rows, layer_similarity)
    del rows
    for u0, u1 in missing:
        descriptions = clip_dissect.describe_units(
            layer_similarity[u0:u1], names, first_unit=u0, rank=ranking[u0:u1]
        )
        results_io.write_block(
            stage.store,
            plan.job_id,
            plan.layer,
            method,
            u0,
            u1,
            [results_io.message_row(d.unit, _clip_result(d)) for d in descriptions],
        )
        done += u1 - u0
        UNITS_EXPLAINED.labels(method).inc(u1 - u0)
        yield stage.progress(method, done, f"units {u0}-{u1}")


def _clip_result(d: clip_dissect.UnitDescription) -> common_pb2.ClipDissectResult:
    return common_pb2.ClipDissectResult(
        label=d.label,
        score=d.score,
        top5=[
            common_pb2.ConceptScore(concept=c, score=s)
            for c, s in zip(d.top_labels, d.top_scores, strict=True)
        ],
    )


# -- linear explanations --------------------------------------------------------------------


def linear_stage(stage: Stage) -> Iterator[Progress]:
    """LE(Label) or LE(CLIP): the concept matrix and its moments shared, one fit per block."""
    plan, method = stage.plan, "linear"
    missing = stage.missing(method)
    if not missing:
        yield stage.stored(method)
        return
    params = linear_settings(plan.spec)
    concepts = stage.shared.linear_concepts(params)
    concepts_ref = stage.shared.ref("linear_concepts", lambda: concepts)
    moments = ray.put(linear.concept_moments(concepts.matrix, concepts.split))
    pooled = stage.shared.pooled_ref("mean")
    if concepts.split.seed != params.seed:
        yield stage.progress(
            method,
            plan.units_total - sum(u1 - u0 for u0, u1 in missing),
            f"the dataset's split is stored with seed {concepts.split.seed}; using it",
        )
    yield from stage.run_blocks(
        method,
        missing,
        lambda u0, u1: block_tasks.linear_block.remote(
            stage.settings, plan, concepts_ref, moments, pooled, u0, u1
        ),
    )


# -- simulation scoring ---------------------------------------------------------------------


def simulation_stage(stage: Stage) -> Iterator[Progress]:
    """Score every stored explanation of the requested units on the test split.

    Reads what the other methods stored for the layer (run it after them), predicts
    each unit from P_sim (`shared_inputs.SharedInputs.simulator`) and stores Pearson ρ
    per method, then the layer's summary over every unit scored so far.
    """
    plan, method = stage.plan, "simulation"
    missing = stage.missing(method)
    summary_key = keys.result_summary(plan.job_id, plan.layer, method)
    if not missing:
        yield stage.stored(method)
        if stage.store.exists(summary_key):
            return
    seed = linear_settings(plan.spec).seed
    sim = stage.shared.simulator(seed)
    stored = {
        m: rows
        for m in SCORED_METHODS
        if (rows := results_io.read_rows(stage.store, plan.job_id, plan.layer, m))
    }
    test = stage.shared.split(seed).test
    shared = (ray.put(sim), ray.put(np.ascontiguousarray(stage.shared.pooled("mean")[test])))
    yield from stage.run_blocks(
        method,
        missing,
        lambda u0, u1: block_tasks.simulation_block.remote(
            stage.settings,
            plan,
            *shared,
            {m: [rows.get(u) for u in range(u0, u1)] for m, rows in stored.items()},
            u0,
            u1,
        ),
    )
    rows = results_io.read_rows(stage.store, plan.job_id, plan.layer, method)
    summary = simulation_summary(rows.values())
    stage.store.put_json(summary_key, {**summary, "simulator": sim.kind, "test_images": len(test)})


def simulation_summary(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ρ ± standard error (ddof 1) per method over live units; dead units apart.

    `rows` are stored simulation rows (`{"unit", "simulation": {method: ρ}, "dead"}`).
    """
    rows = list(rows)
    scores: dict[str, list[float]] = {}
    for row in rows:
        if row.get("dead"):
            continue
        for m, rho in row.get("simulation", {}).items():
            if isinstance(rho, float | int) and math.isfinite(rho):
                scores.setdefault(m, []).append(float(rho))
    methods = {}
    for m, values in sorted(scores.items()):
        n = len(values)
        mean = sum(values) / n
        sem = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
        methods[m] = {"mean": mean, "sem": sem, "units": n}
    return {
        "units": len(rows),
        "dead_units": sum(bool(row.get("dead")) for row in rows),
        "methods": methods,
    }
