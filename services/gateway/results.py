"""Stored results as the gateway shows them: UnitResult messages, filters, figures, tables.

The explainer and the captioner store result blocks, layer summaries and exports
through `services.common.result_store`, which is also how they are read here. A
dead unit (constant activation) has NaN simulation values in its UnitResult.
Exports are served as their methods stored them (`result_store.read_export`).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from neurodissect.v1 import common_pb2, gateway_pb2

from services.common import result_store
from services.common.result_store import UNIT_METHODS
from services.common.spec_vocabulary import ABLATION_METHOD, OCCLUSION_METHOD, SCORING_METHOD
from services.common.store import ObjectStore

_OPERATORS = re.compile(r"\bAND NOT\b|\bAND\b|\bOR\b|\bNOT\b|[()]")


def _scores(row: dict[str, Any], method: str) -> dict[str, float]:
    """A stored score row's values by method ("NaN" read as NaN)."""
    return {str(m): float(v) for m, v in row.get(method, {}).items()}


def _simulation_values(row: dict[str, Any]) -> dict[str, float]:
    dead = bool(row.get("dead"))
    return {
        str(method): math.nan if dead else float(rho)
        for method, rho in row.get("simulation", {}).items()
    }


def unit_results(
    store: ObjectStore, job_id: str, layer: str, u0: int = 0, u1: int = 0
) -> list[common_pb2.UnitResult]:
    """Every stored answer for units [u0, u1) of a layer (u1 = 0: all), by unit."""
    units: dict[int, common_pb2.UnitResult] = {}

    def unit(number: int) -> common_pb2.UnitResult:
        if number not in units:
            units[number] = common_pb2.UnitResult(layer=layer, unit=number)
        return units[number]

    for method in UNIT_METHODS:
        for number, row in result_store.read_rows(store, job_id, layer, method, u0, u1).items():
            fields = {k: v for k, v in row.items() if k != "unit"}
            answer = getattr(unit(number), method)
            answer.SetInParent()  # the method ran: present even when every field is default
            json_format.ParseDict(fields, answer, ignore_unknown_fields=True)
    for number, row in result_store.read_rows(
        store, job_id, layer, SCORING_METHOD, u0, u1
    ).items():
        unit(number).simulation.update(_simulation_values(row))
    for number, row in result_store.read_rows(
        store, job_id, layer, OCCLUSION_METHOD, u0, u1
    ).items():
        fields = {k: v for k, v in row.items() if k != "unit"}
        json_format.ParseDict(fields, unit(number).occlusion, ignore_unknown_fields=True)
    for number, row in result_store.read_rows(
        store, job_id, layer, ABLATION_METHOD, u0, u1
    ).items():
        unit(number).ablation.update(_scores(row, ABLATION_METHOD))
    return [units[n] for n in sorted(units)]


def formula_leaves(formula: str) -> list[str]:
    """The label names of a printed formula, e.g. '(A OR B) AND NOT C' -> ['A', 'B', 'C']."""
    return [leaf.strip() for leaf in _OPERATORS.split(formula) if leaf.strip()]


def unit_labels(unit: common_pb2.UnitResult) -> list[str]:
    """Every label or caption any method gave the unit, in method order, without repeats."""
    texts: list[str] = []
    if unit.HasField("netdissect") and unit.netdissect.label:
        texts.append(unit.netdissect.label)
    if unit.HasField("compositional"):
        texts.extend(formula_leaves(unit.compositional.formula))
    if unit.HasField("clip_dissect") and unit.clip_dissect.label:
        texts.append(unit.clip_dissect.label)
    if unit.HasField("linear"):
        texts.extend(term.concept for term in unit.linear.terms)
    if unit.HasField("milan") and unit.milan.caption:
        texts.append(unit.milan.caption)
    return list(dict.fromkeys(texts))


def matches(unit: common_pb2.UnitResult, request: gateway_pb2.ListUnitsRequest) -> bool:
    """Tell whether a unit passes the filters of a ListUnits request."""
    nd = unit.netdissect if unit.HasField("netdissect") else None
    if request.detectors_only and not (nd and nd.detector):
        return False
    if request.min_iou > 0 and not (nd and nd.iou >= request.min_iou):
        return False
    if request.significant_only and not (
        unit.HasField("significance") and unit.significance.significant
    ):
        return False
    if request.label:
        wanted = request.label.lower()
        labels = [t.lower() for t in unit_labels(unit)]
        caption_words = unit.milan.caption.lower().split() if unit.HasField("milan") else []
        if wanted not in labels and wanted not in caption_words:
            return False
    return True


def dropping(occlusion: common_pb2.OcclusionSummary) -> str:
    """'75% of 4': the detectors that drop for their own label, of those whose label was hidden."""
    if not occlusion.detectors_tested:
        return "— (no detector's label was occluded)"
    return f"{occlusion.detectors_dropping:.0%} of {occlusion.detectors_tested}"


def summary_rows(summary: common_pb2.LayerSummary) -> list[tuple[str, str]]:
    """(figure, value) rows of a layer summary: units, then the figures of the methods that ran."""
    rows = [("units", str(summary.units))]
    if "netdissect" in summary.methods:
        rows += [
            ("NetDissect detectors", str(summary.detectors)),
            ("unique detector labels", str(summary.unique_labels)),
        ]
        rows += [
            (f"detectors ({category})", str(count))
            for category, count in sorted(summary.detectors_per_category.items())
        ]
    if "significance" in summary.methods:
        rows.append(("significant detectors (Benjamini–Hochberg)",
                     str(summary.significant_detectors)))
    if "threshold_sweep" in summary.methods:
        rows += [
            (f"sweep {p.threshold:g}", f"{p.detectors} detectors, {p.unique_labels} labels,"
             f" {p.unchanged_fraction:.0%} unchanged")
            for p in summary.sweep
        ]
    if SCORING_METHOD in summary.methods:
        rows.append(("dead units", str(summary.dead_units)))
        rows += [
            (f"simulation ρ {method}", f"{mean:.3f} ± {summary.simulation_sem[method]:.3f}")
            for method, mean in sorted(summary.simulation_mean.items())
        ]
    if OCCLUSION_METHOD in summary.methods:
        occ = summary.occlusion
        rows += [
            (f"occlusion ({occ.fill} fill)",
             f"{occ.regions} regions of {occ.concepts} concepts, {occ.forward_passes} forward"
             f" passes, {occ.seconds:.1f} s"),
            ("occlusion ρ(drop, IoU), mean over concepts", f"{occ.mean_correlation:.3f}"),
            ("detectors dropping for their own label", dropping(occ)),
        ]
        if occ.note:
            rows.append(("occlusion note", occ.note))
    if ABLATION_METHOD in summary.methods:
        if summary.ablation_note:
            rows.append(("ablation", summary.ablation_note))
        rows += [
            (f"ablation α {method}", f"{mean:.3f} ± {summary.ablation_sem[method]:.3f}")
            for method, mean in sorted(summary.ablation_mean.items())
        ]
    return rows


def message_dict(message: Message) -> dict[str, Any]:
    """A result message as a JSON-ready dict with proto field names and every field shown."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def unit_dict(unit: common_pb2.UnitResult) -> dict[str, Any]:
    """`{"unit": 0, "netdissect": {...}, ...}`: one key per method that answered."""
    out: dict[str, Any] = {"unit": unit.unit}
    for method in UNIT_METHODS:
        if unit.HasField(method):
            out[method] = message_dict(getattr(unit, method))
    if unit.simulation:
        out["simulation"] = dict(sorted(unit.simulation.items()))
    if unit.HasField(OCCLUSION_METHOD):
        out[OCCLUSION_METHOD] = message_dict(unit.occlusion)
    if unit.ablation:
        out[ABLATION_METHOD] = dict(sorted(unit.ablation.items()))
    return out


def _csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def table_csv(layer: str, units: Sequence[common_pb2.UnitResult]) -> str:
    """One row per unit: each method's answer and score, simulation ρ, occlusion, ablation α."""
    simulated = sorted({m for u in units for m in u.simulation})
    ablated = sorted({m for u in units for m in u.ablation})
    header = ["layer", "unit"]
    header += ["netdissect_label", "netdissect_category", "netdissect_iou", "detector"]
    header += ["compositional_formula", "compositional_iou"]
    header += ["clip_dissect_label", "clip_dissect_score"]
    header += ["linear_explanation", "linear_val_corr", "milan_caption"]
    header += ["significance_z", "significance_p", "significant"]
    header += [f"simulation_{m}" for m in simulated]
    header += ["occlusion_top_concept", "occlusion_top_drop", "occlusion_own_drop",
               "occlusion_matches_netdissect"]
    header += [f"ablation_{m}" for m in ablated]
    rows = []
    for u in units:
        nd, comp, cd, lin = u.netdissect, u.compositional, u.clip_dissect, u.linear
        row: list[object] = [layer, u.unit]
        row += (
            [nd.label, nd.category, f"{nd.iou:.6f}", nd.detector]
            if u.HasField("netdissect")
            else ["", "", "", ""]
        )
        row += [comp.formula, f"{comp.iou:.6f}"] if u.HasField("compositional") else ["", ""]
        row += [cd.label, f"{cd.score:.6f}"] if u.HasField("clip_dissect") else ["", ""]
        row += [lin.explanation, f"{lin.val_corr:.6f}"] if u.HasField("linear") else ["", ""]
        row.append(u.milan.caption if u.HasField("milan") else "")
        sig = u.significance
        row += (
            [f"{sig.z:.6f}", f"{sig.p_value:.6g}", sig.significant]
            if u.HasField("significance")
            else ["", "", ""]
        )
        row += [f"{u.simulation[m]:.6f}" if m in u.simulation else "" for m in simulated]
        occ = u.occlusion
        row += (
            [occ.top_concept, f"{occ.top_drop:.6f}", f"{occ.own_drop:.6f}",
             occ.matches_netdissect]
            if u.HasField(OCCLUSION_METHOD)
            else ["", "", "", ""]
        )
        row += [f"{u.ablation[m]:.6f}" if m in u.ablation else "" for m in ablated]
        rows.append(row)
    return _csv(header, rows)
