"""CLIP-Dissect as an explainer method: soft-WPMI (or another similarity) over the whole layer.

Step 1 runs on every block of the layer, not only the requested ones: the
soft-WPMI marginal is taken over all units of the layer, so the label of a unit
depends neither on the block size nor on how a layer is split across requests.
The layer's similarity and concept ranking are then shared with the block tasks,
which only pick each unit's label and top concepts.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from neurodissect.v1 import common_pb2, explainer_pb2

from services.common.result_store import message_row
from services.common.spec_vocabulary import (
    DEFAULT_POOLING,
    DEFAULT_SIMILARITY,
    POOLINGS,
    SIMILARITIES,
    Pooling,
    Similarity,
)
from services.common.store import ObjectStore
from services.explainer import clip_dissect
from services.explainer.explain_plan import ExplainPlan, check_choice
from services.explainer.method_contract import ExplainMethod, Shared
from services.explainer.sharding import BlockOutcome, attempt_number, block_task, gather
from services.explainer.stage_runner import Stage


@dataclass(frozen=True)
class ClipDissectParams:
    """Similarity function and pooling of the unit activations."""

    similarity: Similarity
    pooling: Pooling


@block_task
def concept_rows(
    similarity: str, pooled: np.ndarray, prepared: np.ndarray, u0: int, u1: int
) -> BlockOutcome:
    """Step 1 for units [u0, u1): their (u1 - u0, C) float32 rows, in `BlockOutcome.value`.

    `pooled` is the layer's (N, U) pooled activations, `prepared` the (N, C) concept
    matrix of `clip_dissect.prepare_concepts`; both are shared objects.
    """
    rows = clip_dissect.unit_rows(similarity, pooled[:, u0:u1], prepared)
    return BlockOutcome(u0, u1, attempt_number(), computed=True, value=rows)


def descriptions_csv(layer: str, rows: Mapping[int, Mapping[str, Any]]) -> str:
    """CLIP-Dissect's export: `layer,unit,description,similarity`, one row per unit in order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["layer", "unit", "description", "similarity"])
    for unit in sorted(rows):
        row = rows[unit]
        writer.writerow([layer, unit, row.get("label", ""), f"{row.get('score', 0.0):.6f}"])
    return out.getvalue()


class ClipDissect(ExplainMethod):
    """CLIP-Dissect (Oikarinen & Weng 2023): the open-vocabulary concept of each unit."""

    name = "clip_dissect"
    reads_labels = False

    def params(self, spec: common_pb2.DissectionSpec) -> ClipDissectParams:
        """ClipDissectParams with defaults (`soft_wpmi`, spatial mean)."""
        p = spec.clip_dissect
        check_choice(p.similarity, SIMILARITIES, "spec.clip_dissect.similarity")
        check_choice(p.pooling, POOLINGS, "spec.clip_dissect.pooling")
        return ClipDissectParams(
            similarity=next((s for s in SIMILARITIES if s == p.similarity), DEFAULT_SIMILARITY),
            pooling=next((s for s in POOLINGS if s == p.pooling), DEFAULT_POOLING),
        )

    def embeddings(
        self, request: explainer_pb2.ExplainRequest
    ) -> list[tuple[str, explainer_pb2.ConceptEmbeddings, str]]:
        """The CLIP embeddings of the probe images and the concept set."""
        return [(self.name, request.clip_dissect, "CLIP-Dissect")]

    def prepare(self, stage: Stage, params: ClipDissectParams) -> Generator[str, None, Shared]:
        """Step 1 over every block of the layer; the layer's similarity and ranking, shared."""
        plan = stage.plan
        yield "CLIP similarities of the probe images and the concepts"
        names, similarity = stage.shared.clip_similarity(plan.embeddings[self.name])
        # S is this stage's own fresh array: P̃ may be written over it (no second (N, C) array)
        prepared = ray.put(
            clip_dissect.prepare_concepts(params.similarity, similarity, overwrite=True)
        )
        del similarity
        yield f"{params.pooling}-pooled activations"
        pooled = stage.shared.pooled_ref(params.pooling)
        refs = [
            concept_rows.remote(params.similarity, pooled, prepared, u0, u1)
            for u0, u1 in plan.layer_blocks()
        ]
        rows = np.empty((plan.n_units, len(names)), dtype=np.float32)
        scored = 0
        for outcome in gather(refs, stage.is_active):
            rows[outcome.u0 : outcome.u1] = outcome.value
            scored += outcome.units
            yield f"concept scores of {scored}/{plan.n_units} units"
        yield "the layer's similarity and concept ranking"
        layer_similarity = clip_dissect.layer_similarity(params.similarity, rows)
        ranking = clip_dissect.layer_ranking(params.similarity, rows, layer_similarity)
        del rows
        return names, ray.put(layer_similarity), ray.put(ranking)

    def block_rows(
        self,
        store: ObjectStore,
        plan: ExplainPlan,
        params: ClipDissectParams,
        u0: int,
        u1: int,
        *shared: Any,
    ) -> list[dict[str, Any]]:
        """Label, score and top 5 of units [u0, u1) from the (U, C) layer similarity and ranking."""
        names: list[str]
        names, layer_similarity, ranking = shared
        # the block's own writable rows: Ray's shared arrays are read-only
        descriptions = clip_dissect.describe_units(
            layer_similarity[u0:u1].copy(), names, first_unit=u0, rank=ranking[u0:u1].copy()
        )
        return [message_row(d.unit, result_message(d)) for d in descriptions]

    def exports(
        self, stage: Stage, params: Any, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, str]:
        """descriptions.csv of every stored unit."""
        return {self.name: descriptions_csv(stage.plan.layer, rows)}


def result_message(d: clip_dissect.UnitDescription) -> common_pb2.ClipDissectResult:
    """The stored ClipDissectResult of one unit's description."""
    return common_pb2.ClipDissectResult(
        label=d.label,
        score=d.score,
        top5=[
            common_pb2.ConceptScore(concept=c, score=s)
            for c, s in zip(d.top_labels, d.top_scores, strict=True)
        ],
    )
