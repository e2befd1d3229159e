"""Simulation scoring as an explainer method: how well each stored explanation predicts its unit.

Runs after the methods it scores (it reads what they stored for the layer):
predicts each unit on the test images of the dataset's split from P_sim
(`simulator`) and stores Pearson ρ per method, then the layer's mean ρ ± standard
error per method over the live units. A dead unit (constant on the test images)
is stored with `dead` and NaN scores and counted apart.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping, Sequence
from typing import Any

import numpy as np
import ray
from neurodissect.v1 import common_pb2, explainer_pb2

from services.common.result_store import SAMPLE_IMAGES, read_rows, simulation_row, write_sample
from services.common.spec_vocabulary import SCORED_METHODS, SCORING_METHOD
from services.common.store import ObjectStore
from services.explainer import linear, simulation
from services.explainer.explain_plan import ExplainPlan
from services.explainer.method_contract import ExplainMethod, Shared
from services.explainer.methods.linear import split_seed
from services.explainer.simulated_predictions import Simulator, block_predictions
from services.explainer.stage_runner import Stage


def simulator(stage: Stage, seed: int) -> Simulator:
    """P_sim on the test images of the split (loaded once per call, `simulator_on`)."""
    return simulator_on(stage, "simulator", stage.shared.split(seed).test)


def simulator_on(stage: Stage, name: str, images: np.ndarray) -> Simulator:
    """P_sim on the probe images `images` (n,), loaded once per call under `name`.

    With the request's `simulation` embeddings: σ(a·(S + b)) of the simulator CLIP's
    cosines, (a, b) calibrated on the probe labels that share a name with a text (as
    LE(CLIP)), plain cosines when none does. Without: the label matrix. Ablation
    scoring predicts its validation and test images with the same simulator.
    """

    def load() -> Simulator:
        embeddings = stage.plan.embeddings[SCORING_METHOD]
        if not embeddings.text_key:
            names = [c.name for c in stage.shared.table().labels]
            return Simulator("labels", names, stage.shared.label_matrix()[images])
        names, similarity = stage.shared.clip_similarity(embeddings)
        fitted = stage.shared.calibrate(names, similarity)
        if fitted is None:
            return Simulator("clip cosine", names, similarity[images])
        a, b = fitted
        matrix = linear.clip_concept_matrix(similarity[images], a, b)
        return Simulator(f"clip sigmoid a={a:g} b={b:g}", names, matrix)

    result: Simulator = stage.shared.value(name, load)
    return result


def score_rows(
    u0: int,
    sim: Simulator,
    test_activations: np.ndarray,
    rows: Mapping[str, Sequence[Mapping[str, Any] | None]],
) -> list[dict[str, Any]]:
    """Simulation rows of units u0, u0+1, …: Pearson ρ per method on the test images.

    `sim` is P_sim on the test images, `test_activations` the block's (n_test, B)
    pooled means there, `rows[method][k]` the stored explanation of unit u0 + k
    (None: none). A dead unit (constant on the test images) gets `dead` and NaN scores.
    """
    dead = simulation.dead_units(test_activations)
    scores = {
        method: simulation.unit_correlations(
            block_predictions(method, method_rows, sim), test_activations
        )
        for method, method_rows in rows.items()
    }
    out = []
    for k in range(test_activations.shape[1]):
        rhos = {
            m: float(rho[k])
            for m, rho in scores.items()
            if rows[m][k] is not None and (dead[k] or np.isfinite(rho[k]))
        }
        out.append(simulation_row(u0 + k, rhos, bool(dead[k])))
    return out


def scatter_sample(
    sim: Simulator,
    test_activations: np.ndarray,
    rows: Mapping[str, Sequence[Mapping[str, Any] | None]],
    test: np.ndarray,
) -> dict[str, np.ndarray]:
    """The block's scatter plot arrays on up to SAMPLE_IMAGES test images, evenly spaced.

    `test` (n_test,) are the test images' ids, `test_activations` (n_test, B) their
    pooled means. Returns `images` (S,) int64, `methods` (M,) str, `actual` (S, B) and
    `predicted` (M, S, B) float32 (NaN where a method has no prediction).
    """
    n_test = len(test)
    picked = np.unique(np.linspace(0, n_test - 1, min(SAMPLE_IMAGES, n_test)).astype(np.int64))
    sub = Simulator(sim.kind, sim.names, sim.matrix[picked])
    methods = sorted(rows)
    predicted = np.stack(
        [block_predictions(m, rows[m], sub) for m in methods]
    ) if methods else np.zeros((0, len(picked), test_activations.shape[1]))
    return {
        "images": np.asarray(test, dtype=np.int64)[picked],
        "methods": np.array(methods, dtype=str),
        "actual": test_activations[picked].astype(np.float32),
        "predicted": predicted.astype(np.float32),
    }


def layer_summary(rows: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ρ ± standard error (ddof 1; 0 for one unit) per method over live units.

    `rows` are stored simulation rows (`{"unit", "simulation": {method: ρ}, "dead"}`);
    dead units are counted apart, non-finite ρ left out.
    """
    scores: dict[str, list[float]] = {}
    for row in rows.values():
        if row.get("dead"):
            continue
        for m, rho in row.get("simulation", {}).items():
            if isinstance(rho, float | int) and math.isfinite(rho):
                scores.setdefault(m, []).append(float(rho))
    mean, sem, scored = {}, {}, {}
    for m, values in sorted(scores.items()):
        n = len(values)
        mean[m] = sum(values) / n
        sem[m] = math.sqrt(sum((v - mean[m]) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0
        scored[m] = n
    return {
        "units": len(rows),
        "dead_units": sum(bool(row.get("dead")) for row in rows.values()),
        "simulation_mean": mean,
        "simulation_sem": sem,
        "scored_units": scored,
    }


class Simulation(ExplainMethod):
    """Simulation scoring (specs/linear.md): Pearson ρ of each explanation's prediction."""

    name = SCORING_METHOD

    def params(self, spec: common_pb2.DissectionSpec) -> int:
        """The split seed (shared with linear explanations)."""
        return split_seed(spec)

    def embeddings(
        self, request: explainer_pb2.ExplainRequest
    ) -> list[tuple[str, explainer_pb2.ConceptEmbeddings, str]]:
        """A CLIP simulator's embeddings, when the request names any."""
        if request.simulation.image_key or request.simulation.text_key:
            return [(self.name, request.simulation, "a CLIP simulator")]
        return []

    def prepare(self, stage: Stage, params: int) -> Generator[str, None, Shared]:
        """P_sim, the test images' pooled means and every stored explanation of the layer."""
        plan = stage.plan
        yield "the simulator's concept matrix"
        sim = simulator(stage, params)
        yield "stored explanations"
        stored = {
            m: rows
            for m in SCORED_METHODS
            if (rows := read_rows(stage.store, plan.job_id, plan.layer, m))
        }
        test = stage.shared.split(params).test
        test_activations = np.ascontiguousarray(stage.shared.pooled("mean")[test])
        return ray.put(sim), ray.put(test_activations), ray.put(stored), test

    def block_rows(
        self,
        store: ObjectStore,
        plan: ExplainPlan,
        params: int,
        u0: int,
        u1: int,
        *shared: Any,
    ) -> list[dict[str, Any]]:
        """Scores of units [u0, u1) (`score_rows`)."""
        sim: Simulator
        test_activations: np.ndarray
        stored: dict[str, dict[int, dict[str, Any]]]
        test: np.ndarray
        sim, test_activations, stored, test = shared
        rows = {m: [by_unit.get(u) for u in range(u0, u1)] for m, by_unit in stored.items()}
        activations = test_activations[:, u0:u1]
        sample = scatter_sample(sim, activations, rows, test)
        write_sample(store, plan.job_id, plan.layer, self.name, u0, u1, sample)
        return score_rows(u0, sim, activations, rows)

    def summary(
        self, stage: Stage, params: int, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Mean ρ ± standard error per method (`layer_summary`), the simulator, test images."""
        return {
            **layer_summary(rows),
            "simulator": simulator(stage, params).kind,
            "test_images": len(stage.shared.split(params).test),
        }
