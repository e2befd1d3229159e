"""Spatial compositional formulas (the `indres` preset, length 3): ours vs a dense boolean search.

Same synthetic probe set and layer as bench/broden_like.py (112×112 label maps, about 20
labels per image, 1,241 labels; units at 7×7), on fewer images. Label masks are
downsampled to the 7×7 grid by manual(100/256) and pixel-level labels get their
`-X` expansion (2,070 candidates before the preset's top 50). Both sides get the
same grid masks, thresholds and settings (beam 4, 50 candidates, imroun r = 0.75,
OR / AND / AND NOT / WITH / CLOSE TO / CLOSE with pushed operands, linear length
penalty 0.001) and must find the same formulas with the same scores.

The baseline keeps a dense (N, 7, 7) boolean mask per candidate and scores every
candidate formula one at a time (parent mask reused, the new operation and its
neighbourhood computed densely), the straightforward way of the reference; it runs
on a few units and its rate is extrapolated. Ours holds each image's 7×7 mask in one
64-bit word and scores every candidate of one (parent, operation) at once. Beside
it, the core boolean search (`compositional.explain_units`, same beam and
candidates, length 3, label-set tables at mask resolution) on the same units: the
spatial search should cost no more than 2× the core search per unit. The early
abort is timed apart on a prefix of a quarter of the images. Times are CPU seconds.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
from neurodissect.v1 import common_pb2

from bench.broden_like import CHUNK, SIZES, label_categories, synthetic_acts, synthetic_labels
from services.common.probe_format import LabelChunk
from services.explainer import compositional
from services.explainer.methods.compositional import IMAGE_LEVEL_CATEGORIES, Compositional
from services.explainer.netdissect import unit_thresholds
from services.explainer.spatial_formulas import (
    Close,
    CloseTo,
    Formula,
    Not,
    Or,
    Primitive,
    SpatialExplanation,
    SpatialSearch,
    UnitMask,
    With,
    and_not,
    canonical_key,
    close_to,
    conjoin,
    disjoin,
    explain_unit,
    format_formula,
    spatial_operands,
    well_formed,
    with_operands,
)
from services.explainer.spatial_masks import Grid, expand, label_grid_masks

IMAGES = 400
UNITS = 32
BASELINE_UNITS = 2
TARGET = 20.0
CORE_TARGET = 0.5  # spatial units/s ÷ core units/s: at most 2× the core's cost per unit


def dense_near(masks: np.ndarray) -> np.ndarray:
    """(..., h, w) bool -> cells with an on cell within distance √5 (21 offsets, clamped)."""
    h, w = masks.shape[-2:]
    lead = ((0, 0),) * (masks.ndim - 2)
    padded = np.pad(masks, (*lead, (2, 2), (2, 2)))
    out = np.zeros_like(masks)
    for di, dj in itertools.product(range(-2, 3), repeat=2):
        if di * di + dj * dj <= 5:
            out |= padded[..., 2 + di : 2 + di + h, 2 + dj : 2 + dj + w]
    return out


def dense_eval(formula: Formula, masks: dict[Primitive, np.ndarray]) -> np.ndarray:
    """A formula's (N, h, w) bool mask, evaluated densely from its primitives' masks."""
    if isinstance(formula, Primitive):
        return masks[formula]
    if isinstance(formula, Not):
        return ~dense_eval(formula.operand, masks)
    if isinstance(formula, Or):
        return np.logical_or.reduce([dense_eval(o, masks) for o in formula.operands])
    if isinstance(formula, CloseTo):
        out = dense_eval(formula.left, masks)
        for target in formula.targets:
            out = out & dense_near(dense_eval(target, masks))
        return out
    if isinstance(formula, With):
        right = dense_eval(formula.right, masks)
        return dense_eval(formula.left, masks) & right.any(axis=(1, 2)).reshape(-1, 1, 1)
    if isinstance(formula, Close):
        left, right = dense_eval(formula.left, masks), dense_eval(formula.right, masks)
        return (left & dense_near(right)) | (right & dense_near(left))
    return np.logical_and.reduce([dense_eval(o, masks) for o in formula.operands])


def dense_search(
    unit: np.ndarray, candidates: list[Primitive], masks: np.ndarray, settings: SpatialSearch
) -> SpatialExplanation:
    """The same beam search as `spatial_formulas.explain_unit` on dense (K, N, h, w) masks."""
    cells = unit[0].size
    n = unit.sum(axis=(1, 2))
    total = int(n.sum())
    normaliser = (total - settings.r / cells * float(n @ n)) / total
    min_cells = settings.min_coverage * unit.size

    def scores(mask: np.ndarray) -> tuple[float, float, float]:
        area = mask.sum(axis=(1, 2))
        inside = int(np.count_nonzero(unit & mask))
        union = total + int(area.sum()) - inside
        imrou = (inside - settings.r / cells * int(area @ n)) / union if union else 0.0
        return (inside / union if union else 0.0), imrou, imrou / normaliser

    def pick(s: tuple[float, float, float]) -> float:
        return s[0] if settings.score == "iou" else s[2]

    primary = [pick(scores(m)) for m in masks]
    usable = [k for k in range(len(masks)) if masks[k].sum() >= min_cells]
    order = sorted(usable, key=lambda k: (-primary[k], k))[: settings.top_k]
    chosen = sorted(order)
    prims = {candidates[k]: masks[k] for k in chosen}
    beam: list[tuple[Formula, np.ndarray, int, tuple[float, float, float], float]] = []
    for k in chosen:
        s = scores(masks[k])
        beam.append((candidates[k], masks[k], 1, s, pick(s) * settings.penalty(1)))
    beam = sorted(beam, key=lambda e: -e[4])[: settings.beam]
    for length in range(2, settings.max_length + 1):
        pool = list(beam)
        seen = {canonical_key(e[0]) for e in pool}
        for f, fm, _, _, _ in beam:
            for batch in dense_batches(f, fm, prims):
                scored = [(g, m, scores(m)) for g, m in batch]
                ranked = sorted(
                    range(len(scored)),
                    key=lambda i: (-pick(scored[i][2]) * settings.penalty(length), i),
                )
                added = 0
                for i in ranked:
                    if added == settings.beam:
                        break
                    g, m, s = scored[i]
                    if m.sum() < min_cells or canonical_key(g) in seen or not well_formed(g):
                        continue
                    seen.add(canonical_key(g))
                    pool.append((g, m, length, s, pick(s) * settings.penalty(length)))
                    added += 1
        beam = sorted(pool, key=lambda e: -e[4])[: settings.beam]
    top = beam[0]
    return SpatialExplanation(top[0], *top[3])


def dense_batches(
    f: Formula, fm: np.ndarray, prims: dict[Primitive, np.ndarray]
) -> list[list[tuple[Formula, np.ndarray]]]:
    """Every extension of `f` ((N, h, w) mask `fm`) by each candidate, in the search's order."""
    f_near, f_images = dense_near(fm), fm.any(axis=(1, 2)).reshape(-1, 1, 1)
    items = list(prims.items())
    batches: list[list[tuple[Formula, np.ndarray]]] = [
        [(disjoin(f, p), fm | pm) for p, pm in items],
        [(conjoin(f, p), fm & pm) for p, pm in items],
        [(and_not(f, p), fm & ~pm) for p, pm in items],
        [(With(f, p), fm & pm.any(axis=(1, 2)).reshape(-1, 1, 1)) for p, pm in items],
        [(With(p, f), pm & f_images) for p, pm in items],
        [(close_to(f, p), fm & dense_near(pm)) for p, pm in items],
        [(close_to(p, f), pm & f_near) for p, pm in items],
        [(Close(f, p), (fm & dense_near(pm)) | (pm & f_near)) for p, pm in items],
    ]
    if isinstance(f, With | CloseTo | Close):
        operands = spatial_operands(f)
        for k, side in enumerate(operands):
            for join in (disjoin, and_not):
                pushed = [
                    with_operands(f, (*operands[:k], join(side, p), *operands[k + 1 :]))
                    for p in prims
                ]
                batches.append([(g, dense_eval(g, prims)) for g in pushed])
    return batches


def run() -> list[dict[str, object]]:
    categories = label_categories()
    raw = synthetic_labels(7, IMAGES)
    acts = synthetic_acts(7, raw)[:, :UNITS]
    thresholds = unit_thresholds(lambda: iter([acts]))
    spec = common_pb2.DissectionSpec()
    spec.compositional.preset = "indres"
    params = Compositional().params(spec)
    assert params.spatial is not None and params.spatial.search.abort_images > IMAGES
    settings = params.spatial.search

    grid = Grid(*acts.shape[2:])
    labels = np.flatnonzero(categories >= 0)
    started = time.process_time()
    masks = np.concatenate(
        [
            label_grid_masks(raw.pixel[i0 : i0 + CHUNK], raw.image[i0 : i0 + CHUNK], labels, grid)
            for i0 in range(0, IMAGES, CHUNK)
        ],
        axis=1,
    )
    image_level = [CATEGORY for CATEGORY in IMAGE_LEVEL_CATEGORIES if CATEGORY in SIZES]
    category_names = list(SIZES)
    pixel_level = [
        k for k, label in enumerate(labels) if category_names[categories[label]] not in image_level
    ]
    masks = np.concatenate([masks, grid.pack(expand(grid.unpack(masks[pixel_level])))])
    candidates = [Primitive(int(x)) for x in labels] + [
        Primitive(int(labels[k]), expanded=True) for k in pixel_level
    ]
    layer_seconds = time.process_time() - started

    started = time.process_time()
    unit_bits = grid.pack(acts > thresholds[None, :, None, None]).transpose(1, 0, 2)
    found = [
        explain_unit(UnitMask(unit_bits[u], grid.cells, settings.r), candidates, masks, grid,
                     settings)
        for u in range(UNITS)
    ]
    ours = UNITS / (time.process_time() - started)

    # The core search on the same units with the preset's beam and candidates.
    chunks = [
        LabelChunk(i0, raw.pixel[i0 : i0 + CHUNK], raw.image[i0 : i0 + CHUNK])
        for i0 in range(0, IMAGES, CHUNK)
    ]
    dataset = compositional.dataset_label_sets(chunks, categories)
    core_settings = compositional.SearchSettings(beam=settings.beam, max_length=3,
                                                 top_k=settings.top_k)
    started = time.process_time()
    tables = compositional.UnitLabelSets(thresholds, categories)
    for chunk in chunks:
        tables.update(acts[chunk.i0 : chunk.i1], chunk)
    compositional.explain_units(tables.tables(), dataset, labels[labels > 0], core_settings)
    core = UNITS / (time.process_time() - started)

    # Early abort on a quarter of the images, against no abort, same units.
    timings, means = {}, {}
    for name, variant in (
        ("on", dataclasses.replace(settings, abort_images=IMAGES // 4)),
        ("off", dataclasses.replace(settings, abort_fraction=0.0)),
    ):
        started = time.process_time()
        best = [
            explain_unit(UnitMask(unit_bits[u], grid.cells, settings.r), candidates, masks, grid,
                         variant).imroun
            for u in range(UNITS)
        ]
        timings[name], means[name] = time.process_time() - started, float(np.mean(best))

    dense_masks = grid.unpack(masks)
    started = time.process_time()
    expected = [
        dense_search(grid.unpack(unit_bits[u]), candidates, dense_masks, settings)
        for u in range(BASELINE_UNITS)
    ]
    baseline = BASELINE_UNITS / (time.process_time() - started)
    for u, want in enumerate(expected):
        if (found[u].formula, found[u].imroun) != (want.formula, want.imroun):
            raise AssertionError(f"unit {u}: {found[u].formula} != dense {want.formula}")
    names = {int(x): f"l{x}" for x in labels}
    spatial = sum(
        isinstance(e.formula, With | CloseTo | Close) for e in found if e.formula is not None
    )
    print(
        f"spatial_search: ours {ours:.2f} units/s, dense baseline {baseline:.4f} units/s "
        f"({BASELINE_UNITS} units, extrapolated), core search {core:.2f} units/s; layer masks "
        f"{layer_seconds:.2f} s once; {spatial}/{UNITS} best formulas spatial, e.g. "
        f"{format_formula(found[0].formula, names) if found[0].formula else '-'}"
    )
    print(
        f"early abort (prefix {IMAGES // 4} of {IMAGES} images): {timings['on']:.2f} s vs "
        f"{timings['off']:.2f} s off; mean best imroun {means['on']:.4f} vs {means['off']:.4f}"
    )
    common = (
        f"indres preset (length 3, beam 4, top 50 of {len(candidates)} candidates incl. -X, "
        f"imroun), {IMAGES} images at 7x7; CPU time"
    )
    return [
        {
            "name": "spatial_search",
            "ours": ours,
            "baseline": baseline,
            "unit": "units/s",
            "ratio": ours / baseline,
            "target": TARGET,
            "notes": (
                f"{common}; dense baseline on {BASELINE_UNITS} units, extrapolated; same "
                f"formulas and imroun asserted; layer grid masks {layer_seconds:.2f} s once"
            ),
        },
        {
            "name": "spatial_search_vs_core",
            "ours": ours,
            "baseline": core,
            "unit": "units/s",
            "ratio": ours / core,
            "target": CORE_TARGET,
            "notes": (
                f"{common}; baseline = the core boolean search (same beam and candidates, "
                f"label-set tables at 112x112); target 0.5 = at most 2x the core's cost per "
                f"unit; early abort on {IMAGES // 4} images: {timings['on']:.2f} s vs "
                f"{timings['off']:.2f} s, mean best imroun {means['on']:.4f} vs {means['off']:.4f}"
            ),
        },
    ]


if __name__ == "__main__":
    for record in run():
        print(record)
