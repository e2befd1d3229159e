"""Reading a DissectionSpec from a spec file (protobuf's JSON mapping, or the same in YAML).

A spec file is a user's input like any request: every way it can be wrong is an
InvalidArgument (NotFound for a file that cannot be read) naming the field, so the
CLI exits 2, never with a traceback. Bounds, far above any real spec:

- MAX_SPEC_BYTES bytes of text;
- MAX_SPEC_DEPTH levels of nesting (a DissectionSpec nests 3; deeper input used to
  end in a RecursionError);
- MAX_SPEC_VALUES values in all, counted with YAML aliases expanded (so an alias
  "billion laughs" is refused before protobuf walks it).

Integers outside their field's range are refused by protobuf's JSON parser with the
field named (they are never truncated).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from neurodissect.v1 import common_pb2

from services.common.errors import InvalidArgument, NotFound

MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_DEPTH = 16
MAX_SPEC_VALUES = 100_000

_PARSE_FIELD = re.compile(r"Failed to parse (\w+) field")
_NO_FIELD = re.compile(r'has no field named "(\w+)"')


def _parse_error_field(message: str) -> str:
    path = _PARSE_FIELD.findall(message)
    missing = _NO_FIELD.findall(message)
    return ".".join(path + missing[:1]) or "spec"


def _too_deep() -> InvalidArgument:
    return InvalidArgument(
        f"the spec nests deeper than {MAX_SPEC_DEPTH} levels (a spec nests 3)", field="spec"
    )


def check_shape(data: object) -> None:
    """InvalidArgument if `data` nests deeper than MAX_SPEC_DEPTH or holds too many values."""
    pending: list[tuple[object, int]] = [(data, 1)]
    values = 0
    while pending:
        item, depth = pending.pop()
        values += 1
        if values > MAX_SPEC_VALUES:
            raise InvalidArgument(
                f"the spec holds more than {MAX_SPEC_VALUES} values (aliases expanded)",
                field="spec",
            )
        if isinstance(item, Mapping | list | tuple):
            if depth >= MAX_SPEC_DEPTH:
                raise _too_deep()
            children = item.values() if isinstance(item, Mapping) else item
            pending.extend((child, depth + 1) for child in children)


def spec_from_dict(data: Any) -> common_pb2.DissectionSpec:
    """A DissectionSpec from protobuf's JSON mapping; INVALID_ARGUMENT naming the bad field."""
    if not isinstance(data, Mapping):
        raise InvalidArgument(
            f"a spec is a mapping of fields, not {type(data).__name__}", field="spec"
        )
    check_shape(data)
    try:
        return json_format.ParseDict(dict(data), common_pb2.DissectionSpec())
    except json_format.ParseError as exc:
        message = str(exc).replace("\n", " ")
        raise InvalidArgument(message, field=_parse_error_field(message)) from None
    except (TypeError, ValueError, AttributeError) as exc:
        # Keys that are no strings (YAML allows `1: x`) and values of no JSON type.
        raise InvalidArgument(f"not a spec in protobuf's JSON mapping: {exc}", "spec") from None


def load_spec(path: str | Path) -> common_pb2.DissectionSpec:
    """Read a spec file: protobuf's JSON mapping (.json) or the same fields in YAML."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise NotFound(f"cannot read {path}: {exc.strerror}", field="spec") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise InvalidArgument(f"{path} is larger than {MAX_SPEC_BYTES} bytes", field="spec")
    try:
        text = raw.decode("utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except RecursionError:
        raise _too_deep() from None
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError, ValueError) as exc:
        reason = str(exc).replace("\n", " ")
        raise InvalidArgument(f"{path} is not valid JSON/YAML: {reason}", field="spec") from None
    return spec_from_dict(data)
