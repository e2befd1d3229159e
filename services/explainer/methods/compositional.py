"""Compositional explanations as an explainer method: beam search over label formulas per unit.

Two modes (`compositional.mode`): "boolean" (specs/compositional.md: OR, AND, AND NOT
by IoU at mask resolution, `compositional`) and "spatial" (specs/compositional_spatial.md:
masks on the layer's activation grid, WITH / CLOSE TO / CLOSE, `label-X` expansions,
ImRoU, `spatial_formulas`); the preset "indres" is the spatial reference end to end.

Blocks use Network Dissection's stored thresholds of the job when its spec runs
netdissect with the same quantile, else compute their own (the same values: both
are the exact quantile). Shared once per layer: the probe set's pixel counts per
label set (boolean), or every label's grid masks and expansions (spatial). The
spatial mode exports `formulas.csv` (neuron, category, formula, threshold), the
reference's table.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import ray
from neurodissect.v1 import common_pb2

from services.common import keys
from services.common.activations import iter_units
from services.common.errors import InvalidArgument
from services.common.probe_format import ConceptTable, read_label_chunk
from services.common.result_store import message_row, read_rows
from services.common.spec_vocabulary import (
    ABORT_FRACTION,
    ABORT_IMAGES,
    BEAM,
    COMPOSITIONAL_MODES,
    COMPOSITIONAL_PRESETS,
    COMPOSITIONAL_SPATIAL_FIELDS,
    DEFAULT_COMPOSITIONAL_MODE,
    DEFAULT_FORMULA_SCORE,
    DEFAULT_GRID_DOWNSAMPLING,
    DEFAULT_OPERATOR_SET,
    EXPANSION_NEIGHBOURS,
    FORMULA_LENGTH,
    FORMULA_SCORES,
    GRID_DOWNSAMPLINGS,
    IMROU_R,
    LENGTH_PENALTY,
    LINEAR_LENGTH_PENALTY,
    MANUAL_FRACTION,
    MIN_COVERAGE,
    OPERATOR_SETS,
    FloatField,
    GridDownsampling,
)
from services.common.store import ObjectStore
from services.explainer import compositional, spatial_formulas, spatial_masks
from services.explainer.explain_plan import ExplainPlan, check_choice, check_open_unit
from services.explainer.method_contract import ExplainMethod, Shared
from services.explainer.methods.netdissect import NetDissect, block_unit_thresholds, top_quantile
from services.explainer.stage_runner import Stage

# Image-level categories: no `label-X` expansion of their labels (they cover whole images).
IMAGE_LEVEL_CATEGORIES = ("scene", "texture")


@dataclass(frozen=True)
class SpatialParams:
    """The spatial mode: grid masks, expansions and its beam search."""

    search: spatial_formulas.SpatialSearch
    downsampling: GridDownsampling
    manual_fraction: float
    expansion_neighbours: int


@dataclass(frozen=True)
class CompositionalParams:
    """Beam search settings and the threshold quantile they use; `spatial` in spatial mode."""

    search: compositional.SearchSettings
    top_quantile: float
    spatial: SpatialParams | None = None


Choice = TypeVar("Choice", bound=str)


class _Given:
    """CompositionalParams fields as given, else the preset's value, else None."""

    def __init__(self, p: common_pb2.CompositionalParams) -> None:
        check_choice(p.preset, tuple(COMPOSITIONAL_PRESETS), "spec.compositional.preset")
        self.p, self.preset = p, COMPOSITIONAL_PRESETS.get(p.preset, {})

    def is_set(self, field: str) -> bool:
        """Whether the spec sets `field` itself (optional: present; else non-zero, non-empty)."""
        descriptor = self.p.DESCRIPTOR.fields_by_name[field]
        if descriptor.has_presence:
            return self.p.HasField(field)
        return bool(getattr(self.p, field))

    def get(self, field: str) -> Any:
        """The spec's value of `field`, else the preset's, else None."""
        return getattr(self.p, field) if self.is_set(field) else self.preset.get(field)

    def choice(self, field: str, allowed: tuple[Choice, ...], default: Choice) -> Choice:
        """A string field, one of `allowed` (the spec's or the preset's value), else `default`."""
        value = self.get(field) or default
        check_choice(value, allowed, f"spec.compositional.{field}")
        return next(a for a in allowed if a == value)

    def number(self, field: str, limits: FloatField) -> float:
        """A float field within [low, high], default `limits.default`."""
        value = self.get(field)
        if value is None:
            return limits.default
        if not limits.low <= value <= limits.high:
            raise InvalidArgument(
                f"{value} is outside [{limits.low}, {limits.high}]", f"spec.compositional.{field}"
            )
        return float(value)


class Compositional(ExplainMethod):
    """Compositional explanations (Mu & Andreas 2020; spatial: Harth 2022) per unit."""

    name = "compositional"

    def params(self, spec: common_pb2.DissectionSpec) -> CompositionalParams:
        """CompositionalParams with preset and defaults; the quantile defaults to netdissect's."""
        p = spec.compositional
        given = _Given(p)
        if p.HasField("top_quantile"):
            check_open_unit(p.top_quantile, "spec.compositional.top_quantile")
        for field in ("beam", "max_length", "top_k_primitives", "expansion_neighbours",
                      "abort_images"):
            value = getattr(p, field)
            if value < 0:
                raise InvalidArgument(f"{value} is negative", f"spec.compositional.{field}")
        search = compositional.SearchSettings(
            beam=given.get("beam") or BEAM.default,
            max_length=given.get("max_length") or FORMULA_LENGTH.default,
            top_k=given.get("top_k_primitives") or None,
            length_penalty=(
                p.length_penalty if p.HasField("length_penalty") else LENGTH_PENALTY.default
            ),
        )
        mode = given.get("mode") or DEFAULT_COMPOSITIONAL_MODE
        check_choice(mode, COMPOSITIONAL_MODES, "spec.compositional.mode")
        quantile = p.top_quantile if p.HasField("top_quantile") else top_quantile(spec)
        if mode != "spatial":
            for field in COMPOSITIONAL_SPATIAL_FIELDS:
                if given.is_set(field):
                    raise InvalidArgument(
                        "only the spatial mode reads it (set mode 'spatial')",
                        f"spec.compositional.{field}",
                    )
            return CompositionalParams(search, quantile)
        return CompositionalParams(search, quantile, self._spatial(given, search))

    @staticmethod
    def _spatial(given: _Given, core: compositional.SearchSettings) -> SpatialParams:
        fraction = given.number("manual_fraction", MANUAL_FRACTION)
        if fraction <= 0:
            raise InvalidArgument(
                f"{fraction} is not in (0, 1]", "spec.compositional.manual_fraction"
            )
        neighbours = given.get("expansion_neighbours") or EXPANSION_NEIGHBOURS.default
        if neighbours > EXPANSION_NEIGHBOURS.high:
            raise InvalidArgument(
                f"{neighbours} is above 8 (a cell has 8 neighbours)",
                "spec.compositional.expansion_neighbours",
            )
        search = spatial_formulas.SpatialSearch(
            beam=core.beam,
            max_length=core.max_length,
            top_k=core.top_k,
            score=given.choice("score", FORMULA_SCORES, DEFAULT_FORMULA_SCORE),
            r=given.number("imrou_r", IMROU_R),
            operators=given.choice("operators", OPERATOR_SETS, DEFAULT_OPERATOR_SET),
            length_penalty=core.length_penalty,
            linear_length_penalty=given.number("linear_length_penalty", LINEAR_LENGTH_PENALTY),
            min_coverage=given.number("min_coverage", MIN_COVERAGE),
            abort_images=given.get("abort_images") or ABORT_IMAGES.default,
            abort_fraction=given.number("abort_fraction", ABORT_FRACTION),
        )
        downsampling = given.choice(
            "grid_downsampling", GRID_DOWNSAMPLINGS, DEFAULT_GRID_DOWNSAMPLING
        )
        return SpatialParams(search, downsampling, fraction, neighbours)

    def prepare(self, stage: Stage, params: CompositionalParams) -> Generator[str, None, Shared]:
        """The concept table, NetDissect's thresholds, and the label sets or grid masks."""
        plan = stage.plan
        yield "reading Network Dissection's thresholds"
        thresholds = np.full(plan.n_units, np.nan, dtype=np.float32)
        if (
            plan.spec.HasField(NetDissect.name)
            and top_quantile(plan.spec) == params.top_quantile
        ):
            stored = read_rows(stage.store, plan.job_id, plan.layer, NetDissect.name)
            for unit, row in stored.items():
                thresholds[unit] = row.get("threshold", 0.0)
        if params.spatial is not None:
            h, w = plan.manifest.shape[2:]
            yield f"downsampling the probe set's label masks to the {h}×{w} grid"
            candidates, masks = grid_candidates(stage, params.spatial, spatial_masks.Grid(h, w))
            return stage.shared.table_ref(), ray.put(candidates), ray.put(masks), ray.put(
                thresholds
            )
        yield "counting the probe set's label sets"
        dataset_sets = compositional.dataset_label_sets(
            stage.shared.label_chunks(), stage.shared.table().label_categories()
        )
        return stage.shared.table_ref(), ray.put(dataset_sets), ray.put(thresholds)

    def block_rows(
        self,
        store: ObjectStore,
        plan: ExplainPlan,
        params: CompositionalParams,
        u0: int,
        u1: int,
        *shared: Any,
    ) -> list[dict[str, Any]]:
        """One beam search per unit of [u0, u1).

        Shared: the concept table, the (label set -> pixels) counts of the probe set,
        and (U,) float32 NetDissect thresholds of the layer (NaN where there are none;
        the block computes its own when any is missing).
        """
        table: ConceptTable = shared[0]
        thresholds: np.ndarray = shared[-1]
        block_thresholds = thresholds[u0:u1]
        if not np.isfinite(block_thresholds).all():
            block_thresholds = block_unit_thresholds(store, plan, u0, u1, params.top_quantile)
        if params.spatial is not None:
            return spatial_rows(store, plan, params.spatial, u0, block_thresholds, *shared[:-1])
        dataset_sets: compositional.LabelSetTable = shared[1]
        label_categories = table.label_categories()
        units = compositional.UnitLabelSets(block_thresholds, label_categories)
        for i0, acts in iter_units(store, plan.manifest, u0, u1):
            units.update(acts, read_label_chunk(store, plan.dataset_key, i0, i0 + len(acts)))
        candidates = np.flatnonzero(label_categories >= 0)
        explanations = compositional.explain_units(
            units.tables(), dataset_sets, candidates[candidates > 0], params.search
        )
        names = table.label_names()
        return [
            message_row(
                u0 + k,
                common_pb2.CompositionalResult(
                    formula=(
                        ""
                        if e.formula is None
                        else compositional.format_formula(e.formula, names)
                    ),
                    iou=e.iou,
                    length=e.length,
                ),
            )
            for k, e in enumerate(explanations)
        ]

    def exports(
        self, stage: Stage, params: CompositionalParams, rows: Mapping[int, Mapping[str, Any]]
    ) -> dict[str, str]:
        """Spatial mode: formulas.csv (neuron, category, formula, threshold), as the reference."""
        if params.spatial is None:
            return {}
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["neuron", "category", "formula", "threshold"])
        for unit in sorted(rows):
            row = rows[unit]
            writer.writerow(
                [unit, row.get("category", ""), row.get("formula", ""),
                 f"{float(row.get('threshold', 0.0)):.6g}"]
            )
        return {"compositional": out.getvalue()}


def grid_candidates(
    stage: Stage, spatial: SpatialParams, grid: spatial_masks.Grid
) -> tuple[list[spatial_formulas.Primitive], np.ndarray]:
    """Every label and each pixel-level label's expansion, with (K, N, W) uint64 grid masks.

    Stored once per (dataset, grid, downsampling, expansion) under a content key and
    read back by every later job.
    """
    table = stage.shared.table()
    categories = table.label_categories()
    labels = np.array(sorted(c.number for c in table.labels if categories[c.number] >= 0))
    image_level = {c.number for c in table.labels if c.category in IMAGE_LEVEL_CATEGORIES}
    expandable = np.array([k for k, x in enumerate(labels.tolist()) if x not in image_level],
                          dtype=np.int64)
    digest = keys.content_key(
        "grid masks", grid.h, grid.w, spatial.downsampling, spatial.manual_fraction,
        spatial.expansion_neighbours, labels.tolist(), expandable.tolist(),
    )
    key = keys.grid_masks(stage.plan.dataset_key, digest)
    if stage.store.exists(key):
        masks = stage.store.get_arrays(key)["masks"]
    else:
        chunks = [
            spatial_masks.label_grid_masks(
                chunk.pixel, chunk.image, labels, grid, spatial.downsampling,
                spatial.manual_fraction,
            )
            for chunk in stage.shared.label_chunks()
        ]
        plain = np.concatenate(chunks, axis=1)
        expanded = grid.pack(
            spatial_masks.expand(grid.unpack(plain[expandable]), spatial.expansion_neighbours)
        )
        masks = np.concatenate([plain, expanded])
        stage.store.put_arrays(key, {"masks": masks}, compress=True)
    candidates = [spatial_formulas.Primitive(int(label)) for label in labels] + [
        spatial_formulas.Primitive(int(labels[k]), expanded=True) for k in expandable
    ]
    return candidates, masks


def spatial_rows(
    store: ObjectStore,
    plan: ExplainPlan,
    spatial: SpatialParams,
    u0: int,
    thresholds: np.ndarray,
    table: ConceptTable,
    candidates: list[spatial_formulas.Primitive],
    masks: np.ndarray,
) -> list[dict[str, Any]]:
    """Spatial mode rows of units [u0, u0 + U).

    `thresholds` (U,) float32 T_u; `candidates` with their (K, N, W) uint64 grid masks.
    """
    h, w = plan.manifest.shape[2:]
    grid = spatial_masks.Grid(h, w)
    n_units = len(thresholds)
    parts = [
        grid.pack(acts > thresholds[None, :, None, None]).transpose(1, 0, 2)
        for _, acts in iter_units(store, plan.manifest, u0, u0 + n_units)
    ]
    unit_bits = np.concatenate(parts, axis=1)  # (U, N, W)
    names = table.label_names()
    category = {c.number: c.category for c in table.labels}
    rows = []
    for k in range(n_units):
        unit = spatial_formulas.UnitMask(unit_bits[k], grid.cells, spatial.search.r)
        e = spatial_formulas.explain_unit(unit, candidates, masks, grid, spatial.search)
        first = spatial_formulas.primitives(e.formula)[0].label if e.formula else None
        result = common_pb2.CompositionalResult(
            formula="" if e.formula is None else spatial_formulas.format_formula(e.formula, names),
            iou=e.iou,
            length=e.length,
            imrou=e.imrou,
            imroun=e.imroun,
            category="" if first is None else category[first],
            threshold=float(thresholds[k]),
        )
        rows.append(message_row(u0 + k, result))
    return rows
