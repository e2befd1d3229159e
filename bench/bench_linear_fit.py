"""Linear explanations for 512 units at once vs the same fit called once per unit.

Both sides run `linear.fit_units` (elastic-net ranking by batched coordinate descent on the
Gram matrix, then the greedy selection) on the same synthetic LE(Label)-like input:
20,000 images, 1,000 binary concepts (900 base concepts with frequencies from 0.5% to 20%
and 100 superclass columns, each the OR of 9 base concepts), units that are sparse sums of
3 to 15 concepts plus noise (a tenth of them pure noise). "ours" fits all 512 units in one
call; the baseline calls it with one unit at a time on a subset of the units and its rate
is extrapolated. The layer's concept moments (shared by both, computed once per layer) are
not timed; their time is in the notes, with the same comparison for the elastic net alone
(a per-unit call also repeats the train/val cross-moments, which the batched call shares).

Times are process CPU seconds (all threads), which a shared machine disturbs less than wall
time; numpy's BLAS uses its default threads.
"""

from __future__ import annotations

import json
import time

import numpy as np

from services.explainer.linear import concept_moments, fit_units, ranking_weights, split_images

IMAGES = 20_000
BASE_CONCEPTS = 900
SUPERCLASSES = 100
UNITS = 512
BASELINE_UNITS = 32
TARGET = 10.0


def synthetic(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) float32 binary concepts and (N, U) float32 activations."""
    rng = np.random.default_rng(seed)
    frequency = np.exp(rng.uniform(np.log(0.005), np.log(0.2), BASE_CONCEPTS))
    base = rng.random((IMAGES, BASE_CONCEPTS)) < frequency
    members = rng.integers(0, BASE_CONCEPTS, size=(SUPERCLASSES, 9))
    superclasses = np.stack([base[:, m].any(axis=1) for m in members], axis=1)
    p = np.concatenate([base, superclasses], axis=1).astype(np.float32)
    weights = np.zeros((p.shape[1], UNITS))
    for unit in range(UNITS - UNITS // 10):
        picked = rng.choice(p.shape[1], size=rng.integers(3, 16), replace=False)
        weights[picked, unit] = rng.uniform(0.2, 2.0, len(picked)) * rng.choice(
            [-1, 1], len(picked)
        )
    noise = rng.standard_normal((IMAGES, UNITS)) * rng.uniform(0.1, 1.5, UNITS)
    return p, (p @ weights + noise).astype(np.float32)


def run() -> list[dict[str, object]]:
    p, activations = synthetic()
    split = split_images(IMAGES, seed=0)
    started = time.process_time()
    moments = concept_moments(p, split)
    moments_s = time.process_time() - started

    started = time.process_time()
    batched = fit_units(p, activations, split, moments)
    ours = 1e3 * (time.process_time() - started) / UNITS

    started = time.process_time()
    single = [fit_units(p, activations[:, [u]], split, moments)[0] for u in range(BASELINE_UNITS)]
    baseline = 1e3 * (time.process_time() - started) / BASELINE_UNITS

    # the elastic net alone, from the same train statistics
    y_train = activations[split.train].astype(np.float64)
    centred = y_train - y_train.mean(axis=0)
    cross = p[split.train].astype(np.float64).T @ centred / len(centred)
    variance = y_train.var(axis=0)
    started = time.process_time()
    ranking_weights(moments.train_cov, cross, variance)
    enet_ours = 1e3 * (time.process_time() - started) / UNITS
    started = time.process_time()
    for u in range(BASELINE_UNITS):
        ranking_weights(moments.train_cov, cross[:, [u]], variance[[u]])
    enet_baseline = 1e3 * (time.process_time() - started) / BASELINE_UNITS

    same = all(
        a.concepts == b.concepts and np.allclose(a.weights, b.weights, atol=1e-8)
        for a, b in zip(batched[:BASELINE_UNITS], single, strict=True)
    )
    lengths = np.bincount([len(e.concepts) for e in batched], minlength=11)
    return [
        {
            "name": "linear_fit",
            "ours": ours,
            "baseline": baseline,
            "unit": "ms/unit",
            "ratio": baseline / ours,
            "target": TARGET,
            "notes": (
                f"{UNITS} units × {p.shape[1]} concepts × {IMAGES} images (70/10/20 split), "
                f"CPU ms per unit: all units in one call {ours:.1f} vs one unit per call "
                f"{baseline:.1f} (measured on {BASELINE_UNITS} units); the elastic net alone "
                f"{enet_ours:.2f} vs {enet_baseline:.2f} ms/unit; concept moments "
                f"{moments_s:.1f} s once per layer, not counted; identical explanations: "
                f"{same}; explanation lengths 0..10: {lengths.tolist()}"
            ),
        }
    ]


if __name__ == "__main__":
    for record in run():
        print(json.dumps(record, indent=2))
