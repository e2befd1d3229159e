"""Stored result blocks merged into UnitResult messages, layer summaries and exports.

The explainer and the captioner store, per layer and method, one JSON object per
unit block under `keys.result_block`: `{"units": [{"unit": 7, ...}, ...]}` where the
other fields of a row are that method's result message in protobuf's JSON mapping
(proto field names). Simulation rows carry the correlation of each method's
explanation: `{"unit": 7, "simulation": {"netdissect": 0.31, ...}, "dead": false}`;
a dead unit (constant activation) has `"dead": true` and "NaN" correlations.

Exports (CSV text):
- `tally_csv`: NetDissect-Lite's tally.csv, `unit` 1-based, rows by score descending.
  The `-truth`, `-activation` and `-intersect` pixel counts are not part of
  NetDissectResult and are left empty.
- `clip_dissect_csv`: `layer,unit,description,similarity`.
- `milan_csv`: `layer,unit,description`.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from neurodissect.v1 import common_pb2, gateway_pb2

from services.common import keys
from services.common.store import ObjectStore

# Methods whose answers are fields of UnitResult, in display order.
UNIT_METHODS = ("netdissect", "compositional", "clip_dissect", "linear", "milan")

_OPERATORS = re.compile(r"\bAND NOT\b|\bAND\b|\bOR\b|\bNOT\b|[()]")


def block_ranges(
    store: ObjectStore, job_id: str, layer: str, method: str
) -> list[tuple[int, int, str]]:
    """The stored unit blocks of one layer and method: (u0, u1, key), by u0."""
    blocks = []
    for key in store.list(keys.results_prefix(job_id, layer, method)):
        name = key.rsplit("/", 1)[-1]
        if not (name.startswith("u") and name.endswith(".json")):
            continue
        u0, u1 = keys.parse_span(name)
        blocks.append((u0, u1, key))
    return sorted(blocks)


def covered(store: ObjectStore, job_id: str, layer: str, method: str, n_units: int) -> bool:
    """Tell whether the stored blocks of `method` cover every unit [0, n_units) of `layer`."""
    reached = 0
    for u0, u1, _ in block_ranges(store, job_id, layer, method):
        if u0 > reached:
            return False
        reached = max(reached, u1)
    return reached >= n_units > 0


def read_rows(
    store: ObjectStore, job_id: str, layer: str, method: str, u0: int = 0, u1: int = 0
) -> dict[int, dict[str, Any]]:
    """Rows of `method` for units [u0, u1) (u1 = 0: all), by unit."""
    rows: dict[int, dict[str, Any]] = {}
    for b0, b1, key in block_ranges(store, job_id, layer, method):
        if (u1 and b0 >= u1) or b1 <= u0:
            continue
        for row in store.get_json(key).get("units", []):
            unit = int(row["unit"])
            if unit >= u0 and (not u1 or unit < u1):
                rows[unit] = row
    return rows


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
        for number, row in read_rows(store, job_id, layer, method, u0, u1).items():
            fields = {k: v for k, v in row.items() if k != "unit"}
            answer = getattr(unit(number), method)
            answer.SetInParent()  # the method ran: present even when every field is default
            json_format.ParseDict(fields, answer, ignore_unknown_fields=True)
    for number, row in read_rows(store, job_id, layer, "simulation", u0, u1).items():
        unit(number).simulation.update(_simulation_values(row))
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
    if request.label:
        wanted = request.label.lower()
        labels = [t.lower() for t in unit_labels(unit)]
        caption_words = unit.milan.caption.lower().split() if unit.HasField("milan") else []
        if wanted not in labels and wanted not in caption_words:
            return False
    return True


def layer_summary(
    layer: str, n_units: int, units: Sequence[common_pb2.UnitResult]
) -> common_pb2.LayerSummary:
    """Per-layer figures: NetDissect detectors and labels, mean simulation ρ ± s.e.m.

    A unit whose simulation values are all non-finite (a dead unit: constant
    activation) is counted in `dead_units` and left out of the means.
    """
    summary = common_pb2.LayerSummary(layer=layer, units=n_units)
    detectors = [u.netdissect for u in units if u.HasField("netdissect") and u.netdissect.detector]
    summary.detectors = len(detectors)
    summary.unique_labels = len({d.label for d in detectors})
    summary.detectors_per_category.update(Counter(d.category for d in detectors))
    per_method: dict[str, list[float]] = {}
    for unit in units:
        values = dict(unit.simulation)
        if values and not any(math.isfinite(v) for v in values.values()):
            summary.dead_units += 1
            continue
        for method, value in values.items():
            if math.isfinite(value):
                per_method.setdefault(method, []).append(value)
    for method, rhos in sorted(per_method.items()):
        n = len(rhos)
        mean = sum(rhos) / n
        variance = sum((v - mean) ** 2 for v in rhos) / (n - 1) if n > 1 else 0.0
        summary.simulation_mean[method] = mean
        summary.simulation_sem[method] = math.sqrt(variance / n)
    return summary


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
    return out


def _csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def tally_csv(units: Sequence[common_pb2.UnitResult], categories: Sequence[str] = ()) -> str:
    """NetDissect-Lite's tally.csv for the units that have a NetDissect answer.

    `categories` fixes the per-category column order; empty: categories in the
    order they first appear in the results.
    """
    dissected = [u for u in units if u.HasField("netdissect")]
    order = list(categories) or list(
        dict.fromkeys(c.category for u in dissected for c in u.netdissect.per_category)
    )
    header = ["unit", "category", "label", "score"]
    for category in order:
        header += [f"{category}-{col}" for col in ("label", "truth", "activation", "intersect")]
        header.append(f"{category}-iou")
    rows = []
    for unit in sorted(dissected, key=lambda u: (-u.netdissect.iou, u.unit)):
        nd = unit.netdissect
        best = {c.category: c for c in nd.per_category}
        row: list[object] = [unit.unit + 1, nd.category, nd.label, f"{nd.iou:.6f}"]
        for category in order:
            entry = best.get(category)
            label, iou = (entry.label, f"{entry.iou:.6f}") if entry else ("", "")
            row += [label, "", "", "", iou]
        rows.append(row)
    return _csv(header, rows)


def clip_dissect_csv(layer: str, units: Sequence[common_pb2.UnitResult]) -> str:
    """CLIP-Dissect's export: `layer,unit,description,similarity`."""
    return _csv(
        ["layer", "unit", "description", "similarity"],
        (
            [layer, u.unit, u.clip_dissect.label, f"{u.clip_dissect.score:.6f}"]
            for u in units
            if u.HasField("clip_dissect")
        ),
    )


def milan_csv(layer: str, units: Sequence[common_pb2.UnitResult]) -> str:
    """MILAN's export: `layer,unit,description`."""
    return _csv(
        ["layer", "unit", "description"],
        ([layer, u.unit, u.milan.caption] for u in units if u.HasField("milan")),
    )


def table_csv(layer: str, units: Sequence[common_pb2.UnitResult]) -> str:
    """One row per unit with each method's answer and score, and simulation ρ per method."""
    simulated = sorted({m for u in units for m in u.simulation})
    header = ["layer", "unit"]
    header += ["netdissect_label", "netdissect_category", "netdissect_iou", "detector"]
    header += ["compositional_formula", "compositional_iou"]
    header += ["clip_dissect_label", "clip_dissect_score"]
    header += ["linear_explanation", "linear_val_corr", "milan_caption"]
    header += [f"simulation_{m}" for m in simulated]
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
        row += [f"{u.simulation[m]:.6f}" if m in u.simulation else "" for m in simulated]
        rows.append(row)
    return _csv(header, rows)
