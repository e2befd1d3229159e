"""Compositional explanations (length 3, beam 5): ours vs a dense boolean search.

Same synthetic probe set and layer as bench/broden_like.py (112×112 label maps, about 20
labels per image, 1,241 labels; 512 units at 7×7), on fewer images. All labels are
candidates. The baseline keeps a full-dataset boolean mask for every label and
the unit, and scores every candidate formula of the beam search densely (the
straightforward way, as compexp does with its masks); it runs on a few units and
its rate is extrapolated. Ours builds each unit's label-set table from its mask
pixels and scores candidates from co-occurrence counts; its rate includes that
table building, not the dataset's table (built once per dataset, timed apart).
Both must find the same formulas with the same IoUs. Times are CPU seconds.
"""

from __future__ import annotations

import time

import numpy as np

from bench.broden_like import CHUNK, label_categories, synthetic_acts, synthetic_labels
from services.common.probe_format import LabelChunk
from services.explainer.compositional import (
    And,
    Formula,
    Leaf,
    Not,
    Or,
    SearchSettings,
    UnitLabelSets,
    canonical_key,
    dataset_label_sets,
    explain_units,
)
from services.explainer.netdissect import unit_thresholds
from services.explainer.upsample import BilinearResize

IMAGES = 24
UNITS = 64
BASELINE_UNITS = 2
TARGET = 20.0
SETTINGS = SearchSettings(beam=5, max_length=3)


def dense_search(
    unit_mask: np.ndarray, masks: dict[int, np.ndarray], candidates: list[int]
) -> tuple[Formula | None, float]:
    """Beam search scoring every candidate formula on full-dataset boolean masks."""
    empty = np.zeros_like(unit_mask)
    total = int(unit_mask.sum())

    def score(mask: np.ndarray) -> tuple[int, float]:
        inside = int(np.count_nonzero(unit_mask & mask))
        union = total + int(np.count_nonzero(mask)) - inside
        return inside, inside / union if union else 0.0

    scored = {label: score(masks.get(label, empty)) for label in candidates}
    beam: list[tuple[Formula, np.ndarray, float]] = [
        (Leaf(x), masks.get(x, empty), scored[x][1]) for x in candidates if scored[x][0]
    ]
    beam = sorted(beam, key=lambda e: -e[2])[: SETTINGS.beam]
    for _ in range(2, SETTINGS.max_length + 1):
        pool = list(beam)
        seen = {canonical_key(formula) for formula, _, _ in pool}
        for parent, parent_mask, _ in beam:
            for op in ("or", "and", "and not"):
                for label in candidates:
                    label_mask = masks.get(label, empty)
                    formula: Formula
                    if op == "or":
                        mask, formula = parent_mask | label_mask, Or(parent, Leaf(label))
                    elif op == "and":
                        mask, formula = parent_mask & label_mask, And(parent, Leaf(label))
                    else:
                        mask, formula = parent_mask & ~label_mask, And(parent, Not(Leaf(label)))
                    inside, value = score(mask)
                    if not inside or np.array_equal(mask, parent_mask):
                        continue
                    key = canonical_key(formula)
                    if key not in seen:
                        seen.add(key)
                        pool.append((formula, mask, value))
        beam = sorted(pool, key=lambda e: -e[2])[: SETTINGS.beam]
    return (beam[0][0], beam[0][2]) if beam else (None, 0.0)


def run() -> list[dict[str, object]]:
    categories = label_categories()
    raw = synthetic_labels(7, IMAGES)
    labels = [
        LabelChunk(i0, raw.pixel[i0 : i0 + CHUNK], raw.image[i0 : i0 + CHUNK])
        for i0 in range(0, IMAGES, CHUNK)
    ]
    acts = synthetic_acts(7, raw)[:, :UNITS]
    thresholds = unit_thresholds(lambda: iter([acts]))
    candidates = np.flatnonzero(categories >= 0)

    started = time.process_time()
    dataset = dataset_label_sets(labels, categories)
    dataset_seconds = time.process_time() - started
    started = time.process_time()
    tables = UnitLabelSets(thresholds, categories)
    for chunk in labels:
        tables.update(acts[chunk.i0 : chunk.i1], chunk)
    found = explain_units(tables.tables(), dataset, candidates, SETTINGS)
    ours = UNITS / (time.process_time() - started)

    # Dense masks: every label present, and each unit's thresholded resize.
    sh, sw = raw.pixel.shape[2:]
    masks: dict[int, np.ndarray] = {}
    for label in np.unique(np.r_[raw.pixel.ravel(), raw.image.ravel()]):
        if label > 0 and categories[label] >= 0:
            masks[int(label)] = (raw.pixel == label).any(axis=1) | (raw.image == label).any(axis=1)[
                :, None, None
            ]
    resized = BilinearResize(acts.shape[2:], (sh, sw))(
        acts[:, :BASELINE_UNITS].transpose(1, 0, 2, 3).reshape(-1, *acts.shape[2:])
    ).reshape(BASELINE_UNITS, IMAGES, sh, sw)
    started = time.process_time()
    expected = [
        dense_search(resized[u] > thresholds[u], masks, candidates.tolist())
        for u in range(BASELINE_UNITS)
    ]
    baseline = BASELINE_UNITS / (time.process_time() - started)
    for u, (formula, value) in enumerate(expected):
        if (found[u].formula, found[u].iou) != (formula, value):
            raise AssertionError(f"unit {u}: {found[u].formula} != dense {formula}")
    lengths = np.bincount([e.length for e in found], minlength=4)
    print(
        f"compositional_search: ours {ours:.2f} units/s, baseline {baseline:.4f} units/s "
        f"({BASELINE_UNITS} units, extrapolated); dataset table {dataset_seconds:.2f} s once "
        f"({len(dataset.rows)} label sets for {IMAGES} images)"
    )
    print(f"formula lengths over {UNITS} units: {lengths.tolist()} (index = leaves)")
    return [
        {
            "name": "compositional_search",
            "ours": ours,
            "baseline": baseline,
            "unit": "units/s",
            "ratio": ours / baseline,
            "target": TARGET,
            "notes": (
                f"length 3, beam 5, {len(candidates)} candidate labels, {IMAGES} images at "
                f"{sh}x{sw}; CPU time; dense baseline on {BASELINE_UNITS} units, extrapolated; "
                f"same formulas and IoUs asserted; dataset table {dataset_seconds:.2f} s once"
            ),
        }
    ]


if __name__ == "__main__":
    for record in run():
        print(record)
