"""Result blocks in the object store: validated writes and per-layer reads.

One JSON object per (layer, method, unit block) under `keys.result_block`:
`{"units": [{"unit": 7, ...}, ...]}`. The other fields of a row are the method's
result message in protobuf's JSON mapping with proto field names
(`json_format.MessageToDict(message, preserving_proto_field_name=True)`); every row
is parsed back into its message before anything is written, so a block the
gateway reads always parses. Simulation rows are
`{"unit": 7, "simulation": {"netdissect": 0.31, ...}, "dead": false}`; a dead unit
(constant activation on the test split) has `"dead": true` and "NaN" correlations.

Writes are idempotent: a block is one object, written whole by an atomic put, and
its presence means the block is done.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from neurodissect.v1 import common_pb2

from services.common import keys
from services.common.store import ObjectStore

# The result message of each method whose rows are one message per unit.
RESULT_MESSAGES: dict[str, type[Message]] = {
    "netdissect": common_pb2.NetDissectResult,
    "compositional": common_pb2.CompositionalResult,
    "clip_dissect": common_pb2.ClipDissectResult,
    "linear": common_pb2.LinearResult,
}
SIMULATION = "simulation"


def message_row(unit: int, message: Message) -> dict[str, Any]:
    """One stored row: `{"unit": unit, ...message in the JSON mapping}`."""
    return {"unit": unit, **json_format.MessageToDict(message, preserving_proto_field_name=True)}


def simulation_row(unit: int, rhos: Mapping[str, float], dead: bool) -> dict[str, Any]:
    """One stored simulation row; correlations that are not finite are written as "NaN"."""
    values = {m: float(r) if math.isfinite(r) else "NaN" for m, r in sorted(rhos.items())}
    return {"unit": unit, "simulation": values, "dead": dead}


def parse_row(method: str, row: Mapping[str, Any]) -> Message:
    """Parse a stored row (less its "unit") into the method's message; ParseError if it is none.

    Simulation rows parse into a `UnitResult` holding only the `simulation` map.
    """
    fields = {k: v for k, v in row.items() if k != "unit"}
    if method == SIMULATION:
        dead = fields.pop("dead", False)
        if not isinstance(dead, bool) or set(fields) - {"simulation"}:
            raise json_format.ParseError(f"bad simulation row {dict(row)!r}")
        return json_format.ParseDict(fields, common_pb2.UnitResult())
    return json_format.ParseDict(fields, RESULT_MESSAGES[method]())


def check_rows(method: str, u0: int, u1: int, rows: Sequence[Mapping[str, Any]]) -> None:
    """Raise ValueError unless `rows` are exactly units u0..u1-1, in order, each a valid message."""
    units = [row.get("unit") for row in rows]
    if units != list(range(u0, u1)):
        raise ValueError(f"{method} block u{u0}-{u1} holds units {units}")
    for row in rows:
        try:
            parse_row(method, row)
        except json_format.ParseError as exc:
            raise ValueError(f"{method} row of unit {row['unit']} is not valid: {exc}") from exc


def write_block(
    store: ObjectStore,
    job_id: str,
    layer: str,
    method: str,
    u0: int,
    u1: int,
    rows: Sequence[Mapping[str, Any]],
) -> str:
    """Validate and store the rows of units [u0, u1); return the key written."""
    check_rows(method, u0, u1, rows)
    key = keys.result_block(job_id, layer, method, u0, u1)
    store.put_json(key, {"units": [dict(row) for row in rows]})
    return key


def block_stored(
    store: ObjectStore, job_id: str, layer: str, method: str, u0: int, u1: int
) -> bool:
    """Tell whether the block of units [u0, u1) of `method` is already stored."""
    return store.exists(keys.result_block(job_id, layer, method, u0, u1))


def read_rows(
    store: ObjectStore, job_id: str, layer: str, method: str
) -> dict[int, dict[str, Any]]:
    """Every stored row of `method` for a layer, by unit, whatever block sizes stored them."""
    rows: dict[int, dict[str, Any]] = {}
    for key in store.list(keys.results_prefix(job_id, layer, method)):
        name = key.rsplit("/", 1)[-1]
        if not (name.startswith("u") and name.endswith(".json")):
            continue
        for row in store.get_json(key).get("units", []):
            rows[int(row["unit"])] = row
    return rows


def export_key(job_id: str, layer: str, method: str, name: str) -> str:
    """Key of a per-layer export file of a method, e.g. `results/J/layer4/netdissect/tally.csv`."""
    return keys.results_prefix(job_id, layer, method) + name


def tally_part_key(job_id: str, layer: str, u0: int, u1: int) -> str:
    """Key of one block's rows of NetDissect-Lite's tally.csv (with their pixel counts).

    `results/J/layer4/netdissect/tally/u0-64.csv`: not a result block (not `.json`),
    merged into the layer's `tally.csv` once the blocks are in.
    """
    return export_key(job_id, layer, "netdissect", f"tally/{keys.span('u', u0, u1)}.csv")


def merge_tally_parts(store: ObjectStore, job_id: str, layer: str) -> str:
    """The layer's tally.csv from every stored block part: one header, rows by score descending.

    Ties keep unit order, as in `netdissect.tally_csv` over the whole layer.
    """
    header: list[str] = []
    rows: dict[int, list[str]] = {}
    prefix = tally_part_key(job_id, layer, 0, 0).rsplit("/", 1)[0] + "/"
    for key in store.list(prefix):
        if not key.endswith(".csv"):
            continue
        lines = list(csv.reader(io.StringIO(store.get(key).decode())))
        header = lines[0]
        rows.update({int(line[0]): line for line in lines[1:]})
    ordered = sorted(rows.values(), key=lambda line: (-float(line[3]), int(line[0])))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(ordered)
    return out.getvalue()
