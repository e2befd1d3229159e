"""Compositional explanations as an explainer method: beam search over label formulas per unit.

Blocks use Network Dissection's stored thresholds of the job when its spec runs
netdissect with the same quantile, else compute their own (the same values: both
are the exact quantile). The probe set's pixel counts per label set are computed
once per layer and shared.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from neurodissect.v1 import common_pb2

from services.common.activations import iter_units
from services.common.errors import InvalidArgument
from services.common.probe_format import ConceptTable, read_label_chunk
from services.common.result_store import message_row, read_rows
from services.common.spec_vocabulary import BEAM, FORMULA_LENGTH, LENGTH_PENALTY
from services.common.store import ObjectStore
from services.explainer import compositional, netdissect
from services.explainer.explain_plan import ExplainPlan, check_open_unit
from services.explainer.method_contract import ExplainMethod, Shared
from services.explainer.methods.netdissect import NetDissect, top_quantile
from services.explainer.stage_runner import Stage


@dataclass(frozen=True)
class CompositionalParams:
    """Beam search settings and the threshold quantile they use."""

    search: compositional.SearchSettings
    top_quantile: float


class Compositional(ExplainMethod):
    """Compositional explanations (Mu & Andreas 2020): the best formula of labels per unit."""

    name = "compositional"

    def params(self, spec: common_pb2.DissectionSpec) -> CompositionalParams:
        """CompositionalParams with defaults; the quantile defaults to netdissect's."""
        p = spec.compositional
        if p.HasField("top_quantile"):
            check_open_unit(p.top_quantile, "spec.compositional.top_quantile")
        for field in ("beam", "max_length", "top_k_primitives"):
            value = getattr(p, field)
            if value < 0:
                raise InvalidArgument(f"{value} is negative", f"spec.compositional.{field}")
        return CompositionalParams(
            search=compositional.SearchSettings(
                beam=BEAM.value(p.beam),
                max_length=FORMULA_LENGTH.value(p.max_length),
                top_k=p.top_k_primitives or None,
                length_penalty=(
                    p.length_penalty if p.HasField("length_penalty") else LENGTH_PENALTY.default
                ),
            ),
            top_quantile=p.top_quantile if p.HasField("top_quantile") else top_quantile(spec),
        )

    def prepare(self, stage: Stage, params: CompositionalParams) -> Generator[str, None, Shared]:
        """The concept table, the probe set's label-set counts and NetDissect's thresholds."""
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
        table: ConceptTable
        dataset_sets: compositional.LabelSetTable
        thresholds: np.ndarray
        table, dataset_sets, thresholds = shared
        block_thresholds = thresholds[u0:u1]
        if not np.isfinite(block_thresholds).all():
            block_thresholds = netdissect.unit_thresholds(
                lambda: (acts for _, acts in iter_units(store, plan.manifest, u0, u1)),
                params.top_quantile,
            )
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
