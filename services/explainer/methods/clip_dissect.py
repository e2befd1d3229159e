"""CLIP-Dissect as an explainer method: soft-WPMI (or another similarity) over the whole layer.

Step 1 (each unit's L row or similarity row) runs on the whole layer, not only the
requested blocks: the soft-WPMI marginal is taken over all units of the layer, so the
label of a unit depends neither on the block size nor on how a layer is split across
requests. The layer's similarity and concept ranking are then shared with the block
tasks, which only pick each unit's label and top concepts.

For soft_wpmi and wpmi, step 1 streams, so that no process holds an (N, C) or (N, U)
array: each unit's top images from the stored pooled chunks (`clip_dissect.TopImages`),
P̃ computed and stored image block by image block (`concept_probs`, one task each),
then one task per concept block computing those columns of every unit's L rows
(`clip_dissect.wpmi_rows`), the same values as over the whole matrices. Memory beyond
a task's block is the layer's (U, C) rows, similarity and ranking. cos and cos_cubed
normalise columns over all images and read the (N, C) and (N, U) matrices whole.
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

from services.common.activations import iter_pooled
from services.common.result_store import message_row
from services.common.settings import Settings
from services.common.spec_vocabulary import (
    DEFAULT_POOLING,
    DEFAULT_SIMILARITY,
    POOLINGS,
    SIMILARITIES,
    Pooling,
    Similarity,
)
from services.common.store import ObjectStore
from services.explainer import clip_dissect, concept_probs
from services.explainer.explain_plan import ExplainPlan, check_choice
from services.explainer.method_contract import ExplainMethod, Shared
from services.explainer.sharding import BlockOutcome, attempt_number, block_task, gather
from services.explainer.shared_inputs import text_embeddings
from services.explainer.stage_runner import Stage


@dataclass(frozen=True)
class ClipDissectParams:
    """Similarity function and pooling of the unit activations."""

    similarity: Similarity
    pooling: Pooling


@block_task
def probs_rows(
    settings: Settings,
    digest: str,
    similarity: str,
    images: np.ndarray,
    texts: np.ndarray,
    i0: int,
    i1: int,
) -> BlockOutcome:
    """Store P̃ of images [i0, i1) (`concept_probs.write_rows`); the outcome's range: images.

    `images` (N, D) and `texts` (C, D) are the stored embeddings, shared objects.
    """
    concept_probs.write_rows(settings.open_store(), digest, similarity, images[i0:i1], texts, i0)
    return BlockOutcome(i0, i1, attempt_number(), computed=True)


@block_task
def concept_columns(
    settings: Settings,
    digest: str,
    similarity: str,
    top: np.ndarray,
    n_images: int,
    m0: int,
    m1: int,
) -> BlockOutcome:
    """Step 1, concepts [m0, m1) of every unit: (U, m1 - m0) L rows; the outcome's range: concepts.

    `top` (U, κ) is every unit's top images (shared), P̃'s columns come from the store.
    """
    probs = concept_probs.read_columns(settings.open_store(), digest, n_images, m0, m1)
    rows = clip_dissect.wpmi_rows(similarity, top, probs)
    return BlockOutcome(m0, m1, attempt_number(), computed=True, value=rows)


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
        """Step 1 over the whole layer; the layer's similarity and ranking, shared."""
        if params.similarity in clip_dissect.WPMI_SIMILARITIES:
            names, rows = yield from self._streamed_rows(stage, params)
        else:
            names, rows = yield from self._dense_rows(stage, params)
        yield "the layer's similarity and concept ranking"
        layer_similarity = clip_dissect.layer_similarity(params.similarity, rows)
        ranking = clip_dissect.layer_ranking(params.similarity, rows, layer_similarity)
        del rows
        return names, ray.put(layer_similarity), ray.put(ranking)

    def _streamed_rows(
        self, stage: Stage, params: ClipDissectParams
    ) -> Generator[str, None, tuple[list[str], np.ndarray]]:
        """(U, C) L rows of soft_wpmi or wpmi, streamed (see the module's docstring)."""
        plan, store = stage.plan, stage.store
        embeddings = plan.embeddings[self.name]
        yield f"top images of every unit by {params.pooling}-pooled activation"
        top = clip_dissect.TopImages(params.similarity)
        for pooled in iter_pooled(store, plan.manifest, params.pooling):
            top.add(pooled)
        top_ref = ray.put(top.indices())
        names, texts = text_embeddings(store, embeddings)
        n_images = plan.manifest.n_images
        digest = concept_probs.probs_digest(embeddings, params.similarity)
        missing = [
            (i0, i1)
            for i0, i1 in concept_probs.blocks(n_images, concept_probs.IMAGE_BLOCK)
            if not concept_probs.is_stored(store, digest, len(names), i0, i1)
        ]
        if missing:
            yield "concept probabilities P̃ of the probe images"
            images, texts_ref = ray.put(store.get_array(embeddings.image_key)), ray.put(texts)
            refs = [
                probs_rows.remote(
                    stage.settings, digest, params.similarity, images, texts_ref, i0, i1
                )
                for i0, i1 in missing
            ]
            done = n_images - sum(i1 - i0 for i0, i1 in missing)
            for outcome in gather(refs, stage.is_active):
                done += outcome.units
                yield f"concept probabilities of {done}/{n_images} images"
            del images, texts_ref
        refs = [
            concept_columns.remote(
                stage.settings, digest, params.similarity, top_ref, n_images, m0, m1
            )
            for m0, m1 in concept_probs.blocks(len(names), concept_probs.CONCEPT_BLOCK)
        ]
        rows = np.empty((plan.n_units, len(names)), dtype=np.float32)
        scored = 0
        for outcome in gather(refs, stage.is_active):
            rows[:, outcome.u0 : outcome.u1] = outcome.value
            scored += outcome.units
            yield f"concept scores of {scored}/{len(names)} concepts"
        return names, rows

    def _dense_rows(
        self, stage: Stage, params: ClipDissectParams
    ) -> Generator[str, None, tuple[list[str], np.ndarray]]:
        """(U, C) similarity rows of cos or cos_cubed, from the whole (N, C) and (N, U)."""
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
        return names, rows

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
