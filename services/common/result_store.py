"""Result blocks, layer summaries and exports in the object store: the one writer and reader.

Under `results/{job}/{layer}/{method}/`:
- `u{u0}-{u1}.json`: one result block, `{"units": [{"unit": 7, ...}, ...]}`. The
  other fields of a row are the method's result message in protobuf's JSON mapping
  with proto field names. Simulation rows are
  `{"unit": 7, "simulation": {"netdissect": 0.31, ...}, "dead": false}`; a dead unit
  (constant activation on the test split) has `"dead": true` and "NaN" correlations.
  Ablation rows are `{"unit": 7, "ablation": {"netdissect": 0.12, ...}}`, a method left
  out where it has no α.
  Threshold-sweep rows are `{"unit": 7, "sweep": [{"threshold": 0.001, "label": "sky",
  "iou": 0.12, "detector": true}, ...]}`, the unit's best label at each threshold.
  Every row is parsed back into its message before anything is written, so a block
  a reader gets always parses. A block is one object written whole by an atomic
  put: its presence means the block is done, and writing it again is harmless.
- `samples/u{u0}-{u1}.npz`: arrays of a block beside its rows, for plots: simulation's
  scatter sample (`write_sample`: up to `SAMPLE_IMAGES` test images, each unit's actual
  pooled activation and every method's prediction there).
- `summary.json`: the method's per-layer summary, made by the method's own code.
  Its keys that are `LayerSummary` fields (proto names) are the figures shown in
  GetJob, the CLI and the report; other keys are kept for readers of the store.
- export files (`spec_vocabulary.EXPORTS`: `netdissect/tally.csv`,
  `clip_dissect/descriptions.csv`, `milan/captions.csv`, `compositional/formulas.csv`,
  `threshold_sweep/sweep.csv`, `significance/significance.csv`, …), written by their
  method.

The explainer and the captioner write here; the gateway reads here; nothing else
touches these keys.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from neurodissect.v1 import common_pb2

from services.common import keys, spec_vocabulary
from services.common.errors import InvalidArgument, NotFound
from services.common.spec_vocabulary import EXPORTS, METHODS, SCORING_METHOD, SWEEP_METHOD
from services.common.store import ObjectStore

# The methods whose rows are one result message per unit, each a field of UnitResult.
UNIT_METHODS = ("netdissect", "significance", "compositional", "clip_dissect", "linear", "milan")
# The keys of one threshold of a sweep row and their types.
_SWEEP_POINT = {"threshold": float, "label": str, "iou": float, "detector": bool}

# Rows of one message per unit: the methods' answers and occlusion's verification.
MESSAGE_METHODS = (*UNIT_METHODS, spec_vocabulary.OCCLUSION_METHOD)


def _result_message(method: str) -> Message:
    """An empty result message of `method` (the UnitResult field of the same name)."""
    if method not in MESSAGE_METHODS:
        raise ValueError(f"{method!r} stores no result message")
    message: Message = getattr(common_pb2.UnitResult(), method)
    return type(message)()


def message_row(unit: int, message: Message) -> dict[str, Any]:
    """One stored row: `{"unit": unit, ...message in the JSON mapping}`."""
    return {"unit": unit, **json_format.MessageToDict(message, preserving_proto_field_name=True)}


def simulation_row(unit: int, rhos: Mapping[str, float], dead: bool) -> dict[str, Any]:
    """One stored simulation row; correlations that are not finite are written as "NaN"."""
    values = {m: float(r) if math.isfinite(r) else "NaN" for m, r in sorted(rhos.items())}
    return {"unit": unit, "simulation": values, "dead": dead}


def sweep_row(unit: int, points: Sequence[tuple[float, str, float, bool]]) -> dict[str, Any]:
    """One stored threshold-sweep row: the unit's (threshold, label, IoU, detector) at each."""
    return {
        "unit": unit,
        "sweep": [
            {"threshold": float(t), "label": label, "iou": float(iou), "detector": bool(d)}
            for t, label, iou, d in points
        ],
    }


def score_row(method: str, unit: int, scores: Mapping[str, float]) -> dict[str, Any]:
    """One stored row of scores by method (ablation's α): `{"unit": 7, method: {...}}`.

    Scores that are not finite are written as "NaN".
    """
    values = {m: float(v) if math.isfinite(v) else "NaN" for m, v in sorted(scores.items())}
    return {"unit": unit, method: values}


def _parse_row(method: str, row: Mapping[str, Any]) -> None:
    """Parse a stored row (less its "unit"); json_format.ParseError if it is no valid message."""
    fields = {k: v for k, v in row.items() if k != "unit"}
    if method == SWEEP_METHOD:
        points = fields.get("sweep")
        if set(fields) != {"sweep"} or not isinstance(points, list) or not all(
            isinstance(p, dict) and set(p) == set(_SWEEP_POINT)
            and all(isinstance(p[k], t) for k, t in _SWEEP_POINT.items()) for p in points
        ):
            raise json_format.ParseError(f"bad threshold-sweep row {dict(row)!r}")
    elif method == SCORING_METHOD:
        dead = fields.pop("dead", False)
        if not isinstance(dead, bool) or set(fields) - {"simulation"}:
            raise json_format.ParseError(f"bad simulation row {dict(row)!r}")
        json_format.ParseDict(fields, common_pb2.UnitResult())
    elif method == spec_vocabulary.ABLATION_METHOD:
        if set(fields) != {method}:
            raise json_format.ParseError(f"bad ablation row {dict(row)!r}")
        json_format.ParseDict(fields, common_pb2.UnitResult())
    else:
        json_format.ParseDict(fields, _result_message(method))


def write_block(
    store: ObjectStore,
    job_id: str,
    layer: str,
    method: str,
    u0: int,
    u1: int,
    rows: Sequence[Mapping[str, Any]],
) -> str:
    """Check that `rows` are units u0..u1-1 in order, each a valid row; store them; return the key.

    Raises ValueError for rows that are not.
    """
    units = [row.get("unit") for row in rows]
    if units != list(range(u0, u1)):
        raise ValueError(f"{method} block u{u0}-{u1} holds units {units}")
    for row in rows:
        try:
            _parse_row(method, row)
        except json_format.ParseError as exc:
            raise ValueError(f"{method} row of unit {row['unit']} is not valid: {exc}") from exc
    key = keys.result_block(job_id, layer, method, u0, u1)
    store.put_json(key, {"units": [dict(row) for row in rows]})
    return key


def block_stored(
    store: ObjectStore, job_id: str, layer: str, method: str, u0: int, u1: int
) -> bool:
    """Tell whether the block of units [u0, u1) of `method` is stored."""
    return store.exists(keys.result_block(job_id, layer, method, u0, u1))


def block_ranges(
    store: ObjectStore, job_id: str, layer: str, method: str
) -> list[tuple[int, int, str]]:
    """The stored unit blocks of one layer and method: (u0, u1, key), by u0."""
    blocks = []
    for key in store.list(keys.results_prefix(job_id, layer, method)):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("u") and name.endswith(".json"):
            blocks.append((*keys.parse_span(name), key))
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
    """Stored rows of `method` for units [u0, u1) (u1 = 0: all), by unit, whatever the blocks."""
    rows: dict[int, dict[str, Any]] = {}
    for b0, b1, key in block_ranges(store, job_id, layer, method):
        if (u1 and b0 >= u1) or b1 <= u0:
            continue
        for row in store.get_json(key).get("units", []):
            unit = int(row["unit"])
            if unit >= u0 and (not u1 or unit < u1):
                rows[unit] = row
    return rows


# Test images kept per block for simulation's scatter plots (evenly spaced over the split).
SAMPLE_IMAGES = 200


def write_sample(
    store: ObjectStore,
    job_id: str,
    layer: str,
    method: str,
    u0: int,
    u1: int,
    arrays: Mapping[str, np.ndarray],
) -> None:
    """Store a block's plot arrays (`samples/u{u0}-{u1}.npz`).

    Arrays of two or more axes are per unit along their last axis (B = u1 − u0);
    one-axis arrays (image ids, method names) describe the whole block.
    """
    buffer = io.BytesIO()
    np.savez_compressed(buffer, allow_pickle=False, **arrays)
    store.put(keys.result_sample(job_id, layer, method, u0, u1), buffer.getvalue())


def read_sample(
    store: ObjectStore, job_id: str, layer: str, method: str, unit: int
) -> dict[str, np.ndarray] | None:
    """The plot arrays of the block holding `unit`, sliced to it; None when none is stored.

    Arrays of two or more axes are cut to the unit's entry of their last axis; one-axis
    arrays (image ids, method names) are returned whole.
    """
    for key in store.list(keys.result_samples_prefix(job_id, layer, method)):
        u0, u1 = keys.parse_span(key.rsplit("/", 1)[-1].removesuffix(".npz"))
        if u0 <= unit < u1:
            with np.load(io.BytesIO(store.get(key)), allow_pickle=False) as stored:
                return {
                    name: (array[..., unit - u0] if array.ndim > 1 else array)
                    for name, array in ((n, stored[n]) for n in stored.files)
                }
    return None


def write_summary(
    store: ObjectStore, job_id: str, layer: str, method: str, summary: Mapping[str, Any]
) -> None:
    """Store the per-layer summary of `method` (made by the method's own code)."""
    store.put_json(keys.result_summary(job_id, layer, method), dict(summary))


def read_summary(store: ObjectStore, job_id: str, layer: str, method: str) -> dict[str, Any]:
    """The stored per-layer summary of `method`; empty when there is none."""
    key = keys.result_summary(job_id, layer, method)
    return dict(store.get_json(key)) if store.exists(key) else {}


def layer_summary(
    store: ObjectStore, job_id: str, layer: str, n_units: int
) -> common_pb2.LayerSummary:
    """The layer's figures: the LayerSummary fields of every stored method summary.

    `methods` lists the methods that stored one, so a reader shows only their figures.
    """
    summary = common_pb2.LayerSummary()
    figures = common_pb2.LayerSummary.DESCRIPTOR.fields_by_name
    for method in METHODS:
        stored = read_summary(store, job_id, layer, method)
        if not stored:
            continue
        json_format.ParseDict({k: v for k, v in stored.items() if k in figures}, summary)
        summary.methods.append(method)
    summary.layer, summary.units = layer, n_units
    return summary


def export_key(job_id: str, layer: str, export_format: str) -> str:
    """Key of a layer's export file, e.g. `results/J/layer4/netdissect/tally.csv`."""
    if export_format not in EXPORTS:
        raise InvalidArgument(
            f"{export_format!r} is not an export format; use one of {', '.join(EXPORTS)}",
            "format",
        )
    method, name = EXPORTS[export_format]
    return keys.results_prefix(job_id, layer, method) + name


def write_export(
    store: ObjectStore, job_id: str, layer: str, export_format: str, text: str
) -> None:
    """Store a layer's export file (made by the method that owns the format)."""
    store.put(export_key(job_id, layer, export_format), text.encode())


def read_export(store: ObjectStore, job_id: str, layer: str, export_format: str) -> bytes:
    """A layer's stored export file; NotFound when its method has not written it."""
    key = export_key(job_id, layer, export_format)
    if not store.exists(key):
        method = EXPORTS[export_format][0]
        raise NotFound(
            f"layer {layer!r} has no {export_format} export: {method} did not run on it", "layer"
        )
    return store.get(key)
