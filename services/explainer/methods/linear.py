"""Linear explanations as an explainer method: LE(Label) or LE(CLIP), one fit per unit block.

The concept matrix P (the probe set's label matrix, or σ(a·(S + b)) of CLIP
cosines), filtered, and its train/val moments are computed once per layer and
shared; each block fits its units together on its columns of the layer's pooled
means.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from neurodissect.v1 import common_pb2, explainer_pb2

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.result_store import message_row
from services.common.spec_vocabulary import (
    DEFAULT_LINEAR_CONCEPTS,
    LINEAR_CONCEPTS,
    LINEAR_MAX_CONCEPTS,
    LinearConcepts,
)
from services.common.store import ObjectStore
from services.explainer import linear
from services.explainer.explain_plan import ExplainPlan, check_choice
from services.explainer.method_contract import ExplainMethod, Shared
from services.explainer.stage_runner import Stage


@dataclass(frozen=True)
class LinearParams:
    """Concept matrix kind, optional sigmoid (a, b), split seed."""

    concepts: LinearConcepts
    a: float | None
    b: float | None
    seed: int


@dataclass(frozen=True)
class ConceptMatrix:
    """LE's concept matrix after the concept filter, with names and the split."""

    kind: LinearConcepts
    matrix: np.ndarray  # (N, C) float32
    names: list[str]  # (C,)
    split: linear.ImageSplit


def split_seed(spec: common_pb2.DissectionSpec) -> int:
    """The seed of the dataset's train/val/test split (`linear.seed`, default 0)."""
    return spec.linear.seed


def concept_matrix(stage: Stage, params: LinearParams) -> ConceptMatrix:
    """LE's concept matrix P, filtered, with names and split.

    LE(Label): the label matrix. LE(CLIP): σ(a·(S + b)) of the CLIP cosines of the
    request's `linear` embeddings, (a, b) given or calibrated against the labels of
    the probe set that share a name with a concept.
    """
    if params.concepts == "clip":
        matrix, names = _clip_concepts(stage, params)
    else:
        matrix = stage.shared.label_matrix()
        names = [c.name for c in stage.shared.table().labels]
    keep = linear.concept_filter(matrix)
    if not keep.any():
        raise FailedPrecondition(
            "no concept passes LE's filter (top-5 mean >= 0.5, std > 1e-5)",
            "spec.linear.concepts",
        )
    return ConceptMatrix(
        kind=params.concepts,
        matrix=np.ascontiguousarray(matrix[:, keep]),
        names=[n for n, k in zip(names, keep, strict=True) if k],
        split=stage.shared.split(params.seed),
    )


def _clip_concepts(stage: Stage, params: LinearParams) -> tuple[np.ndarray, list[str]]:
    names, similarity = stage.shared.clip_similarity(stage.plan.embeddings[LinearExplanations.name])
    a, b = params.a, params.b
    if a is None or b is None:
        fitted = stage.shared.calibrate(names, similarity)
        if fitted is None:
            raise FailedPrecondition(
                "LE(CLIP) calibrates (a, b) on concepts named like the probe set's labels,"
                " and none is; set spec.linear.a and spec.linear.b",
                "spec.linear.a",
            )
        a = fitted[0] if a is None else a
        b = fitted[1] if b is None else b
    return linear.clip_concept_matrix(similarity, a, b), names


class LinearExplanations(ExplainMethod):
    """Linear explanations (Oikarinen et al.): a sparse weighted sum of concepts per unit."""

    name = "linear"

    def params(self, spec: common_pb2.DissectionSpec) -> LinearParams:
        """LinearParams with defaults (LE(Label), calibrated (a, b), split seed 0)."""
        p = spec.linear
        check_choice(p.concepts, LINEAR_CONCEPTS, "spec.linear.concepts")
        if p.max_concepts not in (0, LINEAR_MAX_CONCEPTS):
            raise InvalidArgument(
                f"{p.max_concepts} is not supported; LE selects at most {LINEAR_MAX_CONCEPTS}"
                " concepts (0 = the default)",
                "spec.linear.max_concepts",
            )
        return LinearParams(
            concepts=next((c for c in LINEAR_CONCEPTS if c == p.concepts), DEFAULT_LINEAR_CONCEPTS),
            a=p.a if p.HasField("a") else None,
            b=p.b if p.HasField("b") else None,
            seed=split_seed(spec),
        )

    def embeddings(
        self, request: explainer_pb2.ExplainRequest
    ) -> list[tuple[str, explainer_pb2.ConceptEmbeddings, str]]:
        """LE(CLIP) needs the CLIP embeddings of the probe images and its concepts."""
        if request.spec.linear.concepts == "clip":
            return [(self.name, request.linear, "LE(CLIP)")]
        return []

    def prepare(self, stage: Stage, params: LinearParams) -> Generator[str, None, Shared]:
        """The filtered concept matrix, its moments and the layer's pooled means, shared."""
        yield "LE's concept matrix"
        concepts = concept_matrix(stage, params)
        if concepts.split.seed != params.seed:
            yield f"the dataset's split is stored with seed {concepts.split.seed}; using it"
        yield "moments of the concept matrix"
        moments = linear.concept_moments(concepts.matrix, concepts.split)
        yield "mean-pooled activations"
        return ray.put(concepts), ray.put(moments), stage.shared.pooled_ref("mean")

    def block_rows(
        self,
        store: ObjectStore,
        plan: ExplainPlan,
        params: LinearParams,
        u0: int,
        u1: int,
        *shared: Any,
    ) -> list[dict[str, Any]]:
        """Fits of units [u0, u1) on the shared (N, C) concept matrix and (N, U) pooled means."""
        concepts: ConceptMatrix
        moments: linear.ConceptMoments
        pooled: np.ndarray
        concepts, moments, pooled = shared
        fits = linear.fit_units(concepts.matrix, pooled[:, u0:u1], concepts.split, moments)
        return [message_row(u0 + k, _result(fit, concepts)) for k, fit in enumerate(fits)]


def _result(fit: linear.LinearExplanation, concepts: ConceptMatrix) -> common_pb2.LinearResult:
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
