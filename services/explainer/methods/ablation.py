"""Ablation scoring as an explainer method: α of every stored explanation of every unit.

Runs after simulation (it scores what the other methods stored, predicted by the
same simulator as simulation: `simulator_on`, `block_predictions`) with the
classifier head and class labels the extractor stored (the request's `ablation`).
Validation and test images are those of the dataset's persisted split that have a
class. A layer without a head (its pooled activations do not feed it) stores rows
with no scores and says why in `ablation_note`. Rows are
`{"unit": 7, "ablation": {"netdissect": 0.12, ...}}`; a method without a score for
the unit (no stored answer, a prediction P_sim cannot make, a unit the loss ignores)
is left out.
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
import torch
from neurodissect.v1 import common_pb2, explainer_pb2

from services.common.errors import InvalidArgument, NotFound
from services.common.result_store import read_rows, score_row
from services.common.spec_vocabulary import (
    ABLATION_METHOD,
    ABLATION_TEMPERATURE,
    ABLATION_VARIANTS,
    DEFAULT_ABLATION_VARIANT,
    MAX_SEED,
    SCORED_METHODS,
    SCORING_METHOD,
    AblationVariant,
)
from services.common.store import ObjectStore
from services.explainer import ablation
from services.explainer.explain_plan import ExplainPlan, check_choice
from services.explainer.method_contract import ExplainMethod, Shared
from services.explainer.methods.simulation import simulator_on
from services.explainer.simulated_predictions import Simulator, block_predictions
from services.explainer.stage_runner import Stage

NO_HEAD = "not scored: no classifier head was stored for this layer"


@dataclass(frozen=True)
class AblationParams:
    """Variant, temperature and the split seed (used when no split is stored yet)."""

    variant: AblationVariant
    temperature: float
    seed: int


@dataclass(frozen=True)
class AblationInputs:
    """Everything a block needs, shared once per layer."""

    head: ablation.Head
    val: ablation.AblationData
    test: ablation.AblationData
    sim: Simulator  # P_sim on the validation images, then the test images
    n_val: int
    stored: dict[str, dict[int, dict[str, Any]]]  # method -> unit -> stored row


def layer_summary(rows: Mapping[int, Mapping[str, Any]], note: str) -> dict[str, Any]:
    """Mean α ± standard error (ddof 1; 0 for one unit) per method over finite scores."""
    scores: dict[str, list[float]] = {}
    for row in rows.values():
        for method, alpha in row.get(ABLATION_METHOD, {}).items():
            if isinstance(alpha, float | int) and math.isfinite(alpha):
                scores.setdefault(method, []).append(float(alpha))
    mean, sem = {}, {}
    for method, values in sorted(scores.items()):
        n = len(values)
        mean[method] = sum(values) / n
        sem[method] = (
            math.sqrt(sum((v - mean[method]) ** 2 for v in values) / (n - 1) / n) if n > 1
            else 0.0
        )
    return {
        "units": len(rows),
        "ablation_mean": mean,
        "ablation_sem": sem,
        "ablation_note": note,
        "ablation_scored_units": {m: len(v) for m, v in scores.items()},
    }


class Ablation(ExplainMethod):
    """Ablation scoring (Linear-Explanations' simulate_ablation): α per method and unit."""

    name = ABLATION_METHOD

    def params(self, spec: common_pb2.DissectionSpec) -> AblationParams:
        """AblationParams with defaults (optim, T = 1.1, seed 0)."""
        p = spec.ablation
        check_choice(p.variant, ABLATION_VARIANTS, "spec.ablation.variant")
        temperature = p.temperature if p.HasField("temperature") else ABLATION_TEMPERATURE.default
        if not (math.isfinite(temperature)
                and ABLATION_TEMPERATURE.low <= temperature <= ABLATION_TEMPERATURE.high):
            raise InvalidArgument(
                f"{temperature} is outside [{ABLATION_TEMPERATURE.low}, "
                f"{ABLATION_TEMPERATURE.high}]", "spec.ablation.temperature"
            )
        if not 0 <= p.seed <= MAX_SEED:
            raise InvalidArgument(f"{p.seed} is outside [0, {MAX_SEED}]", "spec.ablation.seed")
        variant = next((v for v in ABLATION_VARIANTS if v == p.variant), DEFAULT_ABLATION_VARIANT)
        return AblationParams(variant, temperature, p.seed)

    def embeddings(
        self, request: explainer_pb2.ExplainRequest
    ) -> list[tuple[str, explainer_pb2.ConceptEmbeddings, str]]:
        """A CLIP simulator's embeddings, when the request names any (as simulation)."""
        if request.simulation.image_key or request.simulation.text_key:
            return [(SCORING_METHOD, request.simulation, "a CLIP simulator")]
        return []

    def prepare(self, stage: Stage, params: AblationParams) -> Generator[str, None, Shared]:
        """The head, classes, pooled activations, P_sim and stored explanations; or None."""
        plan = stage.plan
        if not plan.ablation.head_key:
            return (None,)
        yield "reading the classifier head and the classes"
        for key, field in ((plan.ablation.head_key, "ablation.head_key"),
                           (plan.ablation.labels_key, "ablation.labels_key")):
            if not stage.store.exists(key):
                raise NotFound(f"no stored object {key!r}", field)
        arrays = stage.store.get_arrays(plan.ablation.head_key)
        head = ablation.Head(arrays["weight"], arrays["bias"])
        classes = stage.store.get_array(plan.ablation.labels_key)
        split = stage.shared.split(params.seed)
        val = split.val[classes[split.val] >= 0]
        test = split.test[classes[split.test] >= 0]
        pooled = stage.shared.pooled("mean")

        def data(images: np.ndarray) -> ablation.AblationData:
            return ablation.AblationData(
                torch.tensor(pooled[images], dtype=torch.float64),
                torch.tensor(classes[images], dtype=torch.int64),
            )

        yield "the simulator's concept matrix"
        sim = simulator_on(stage, "ablation simulator", np.concatenate([val, test]))
        yield "stored explanations"
        stored = {
            m: rows
            for m in SCORED_METHODS
            if (rows := read_rows(stage.store, plan.job_id, plan.layer, m))
        }
        return (ray.put(AblationInputs(head, data(val), data(test), sim, len(val), stored)),)

    def block_rows(
        self,
        store: ObjectStore,
        plan: ExplainPlan,
        params: AblationParams,
        u0: int,
        u1: int,
        *shared: Any,
    ) -> list[dict[str, Any]]:
        """Finite α of units [u0, u1) for every stored method; empty scores without a head."""
        inputs: AblationInputs | None = shared[0]
        if inputs is None or not inputs.stored:
            return [score_row(ABLATION_METHOD, u, {}) for u in range(u0, u1)]
        # Every method's explanations of the block in one fit: column j·B + k is unit
        # u0 + k explained by method j (the fits are independent, see `unit_alphas`).
        methods = list(inputs.stored)
        block = u1 - u0
        predicted = np.hstack([
            block_predictions(m, [inputs.stored[m].get(u) for u in range(u0, u1)], inputs.sim)
            for m in methods
        ])  # (n_val + n_test, len(methods)·B)
        alphas = ablation.unit_alphas(
            inputs.val, inputs.test, inputs.head, np.tile(np.arange(u0, u1), len(methods)),
            predicted[: inputs.n_val], predicted[inputs.n_val :], params.variant,
            params.temperature,
        ).reshape(len(methods), block)
        return [
            score_row(ABLATION_METHOD, u0 + k, {
                m: float(alphas[j, k]) for j, m in enumerate(methods)
                if np.isfinite(alphas[j, k])
            })
            for k in range(block)
        ]

    def summary(
        self, stage: Stage, params: AblationParams, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Mean α ± standard error per method (`layer_summary`), variant, note."""
        note = "" if stage.plan.ablation.head_key else (stage.plan.ablation.note or NO_HEAD)
        return {**layer_summary(rows, note), "ablation_variant": params.variant}

    def exports(
        self, stage: Stage, params: AblationParams, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, str]:
        """ablation.csv: per unit α per method ("" where a method has none)."""
        methods = sorted({m for row in rows.values() for m in row.get(ABLATION_METHOD, {})})
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["unit", *methods])
        for unit in sorted(rows):
            scores = rows[unit].get(ABLATION_METHOD, {})
            writer.writerow([unit, *(scores.get(m, "") for m in methods)])
        return {ABLATION_METHOD: out.getvalue()}
