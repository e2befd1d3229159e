"""Strict decoding of request bytes: what protobuf would accept silently is refused.

protobuf decodes an int32, sint32, uint32 or enum field whose varint does not fit in
32 bits by truncating it (2**32 + 5 arrives as 5), and it nests unknown groups as deep
as the sender likes. `decode` parses the bytes, then walks their wire format against
the message's descriptor and raises InvalidArgument naming the field path for

- bytes that are no valid encoding of the message,
- a 32-bit integer field whose encoded value is out of its type's range,
- messages or groups nested deeper than MAX_DEPTH.

Every service's server decodes its requests with it (services.common.server), so a
user's mistake in raw bytes is INVALID_ARGUMENT, never INTERNAL or a truncated value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from services.common.errors import InvalidArgument

# Deeper than any message of the API (a DissectionSpec nests 3 levels).
MAX_DEPTH = 32

_INT32 = (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_ENUM)
_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1, "int32"),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1, "enum"),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1, "sint32"),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1, "uint32"),
}
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = range(6)


def decode(parse: Callable[[bytes], Message], data: bytes) -> Message:
    """`parse(data)` (a message class's FromString), checked as the module describes."""
    try:
        message = parse(data)
    except (DecodeError, RecursionError) as exc:
        raise InvalidArgument(
            f"the request is not a valid encoded message ({exc or type(exc).__name__});"
            f" messages nest at most {MAX_DEPTH} levels",
            field="request",
        ) from None
    _Walker(data).message(message.DESCRIPTOR, 0, len(data), "", 0)
    return message


class _Walker:
    """One pass over the wire format of already-parsed bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def varint(self, pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if pos >= len(self.data) or shift > 63:
                raise InvalidArgument("the request holds a truncated varint", field="request")
            byte = self.data[pos]
            value |= (byte & 0x7F) << shift
            pos += 1
            shift += 7
            if not byte & 0x80:
                return value, pos

    def message(self, descriptor: Any, pos: int, end: int, path: str, depth: int) -> int:
        """Check fields in [pos, end) (until an end-group tag for a group); return the end."""
        if depth > MAX_DEPTH:
            raise InvalidArgument(
                f"the request nests messages deeper than {MAX_DEPTH} levels",
                field=path or "request",
            )
        counts: dict[int, int] = {}
        while pos < end:
            tag, pos = self.varint(pos)
            number, wire = tag >> 3, tag & 7
            if wire == _END_GROUP:
                return pos
            field = descriptor.fields_by_number.get(number) if descriptor else None
            name = _path(path, field, number, counts)
            pos = self.value(field, wire, pos, name, depth)
        return pos

    def value(
        self, field: FieldDescriptor | None, wire: int, pos: int, path: str, depth: int
    ) -> int:
        """Check one field's value starting at `pos`; return the position after it."""
        if wire == _VARINT:
            raw, pos = self.varint(pos)
            if field is not None:
                _check_range(field, raw, path)
            return pos
        if wire == _FIXED64:
            return pos + 8
        if wire == _FIXED32:
            return pos + 4
        if wire == _START_GROUP:
            return self.message(None, pos, len(self.data), path, depth + 1)
        if wire != _LENGTH:
            raise InvalidArgument(f"wire type {wire} is not valid", field=path)
        length, pos = self.varint(pos)
        end = pos + length
        if field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
            self.message(field.message_type, pos, end, path, depth + 1)
        elif field is not None and field.type in _RANGES:  # packed repeated
            while pos < end:
                raw, pos = self.varint(pos)
                _check_range(field, raw, path)
        return end


def _path(parent: str, field: FieldDescriptor | None, number: int, counts: dict[int, int]) -> str:
    name = field.name if field is not None else f"#{number}"
    if field is not None and field.is_repeated:
        index = counts.get(number, 0)
        counts[number] = index + 1
        name = f"{name}[{index}]"
    return f"{parent}.{name}" if parent else name


def _check_range(field: FieldDescriptor, raw: int, path: str) -> None:
    bounds = _RANGES.get(field.type)
    if bounds is None:
        return
    low, high, kind = bounds
    if field.type == FieldDescriptor.TYPE_SINT32:
        value = (raw >> 1) ^ -(raw & 1)
    elif field.type in _INT32:
        value = raw - 2**64 if raw >= 2**63 else raw
    else:
        value = raw
    if not low <= value <= high:
        raise InvalidArgument(f"{value} is outside the {kind} range [{low}, {high}]", field=path)
