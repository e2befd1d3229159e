"""Strict request decoding: invalid bytes, out-of-range 32-bit integers and deep nesting."""

from __future__ import annotations

import pytest
from neurodissect.v1 import common_pb2, gateway_pb2

from services.common.errors import InvalidArgument
from services.common.request_decoding import MAX_DEPTH, decode


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _submessage(name: str, inner: bytes) -> bytes:
    number = common_pb2.DissectionSpec.DESCRIPTOR.fields_by_name[name].number
    return _field(number, 2, _varint(len(inner)) + inner)


def _batch_size(value: int) -> bytes:
    number = common_pb2.ComputeSpec.DESCRIPTOR.fields_by_name["batch_size"].number
    return _submessage("compute", _field(number, 0, _varint(value)))


def test_a_valid_request_decodes_unchanged() -> None:
    spec = common_pb2.DissectionSpec(layers=["a", "b"], name="x")
    spec.compute.batch_size = 2**31 - 1
    spec.model.input_size = -5  # in range for int32; validation judges it later
    spec.dataset.limit = 2**40  # int64
    assert decode(common_pb2.DissectionSpec.FromString, spec.SerializeToString()) == spec


@pytest.mark.parametrize("value", [2**32 + 5, 2**31, -(2**31) - 1, 2**63])
def test_an_out_of_range_int32_is_refused_naming_the_field(value: int) -> None:
    data = _batch_size(value)
    truncated = common_pb2.DissectionSpec.FromString(data).compute.batch_size
    assert truncated != value  # what protobuf alone would have accepted
    with pytest.raises(InvalidArgument, match=r"^compute\.batch_size: .* outside the int32"):
        decode(common_pb2.DissectionSpec.FromString, data)


def test_repeated_and_packed_enums_are_checked() -> None:
    number = gateway_pb2.ListJobsRequest.DESCRIPTOR.fields_by_name["states"].number
    packed = _varint(1) + _varint(2**33)
    data = _field(number, 2, _varint(len(packed)) + packed)
    with pytest.raises(InvalidArgument, match=r"^states\[0\]: 8589934592 is outside the enum"):
        decode(gateway_pb2.ListJobsRequest.FromString, data)
    fine = gateway_pb2.ListJobsRequest(states=[common_pb2.FAILED, common_pb2.QUEUED])
    assert decode(gateway_pb2.ListJobsRequest.FromString, fine.SerializeToString()) == fine


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08", bytes(range(256))])
def test_bytes_that_are_no_message_are_invalid_argument(garbage: bytes) -> None:
    with pytest.raises(InvalidArgument, match=r"^request: the request is not a valid"):
        decode(common_pb2.DissectionSpec.FromString, garbage)


@pytest.mark.parametrize("levels", [MAX_DEPTH + 2, 5000])
def test_deep_nesting_is_refused_naming_the_limit(levels: int) -> None:
    data = _field(99, 3, b"") * levels + _field(99, 4, b"") * levels  # nested unknown groups
    with pytest.raises(InvalidArgument, match=rf"{MAX_DEPTH} levels"):
        decode(common_pb2.DissectionSpec.FromString, data)


def test_shallow_unknown_fields_are_accepted() -> None:
    data = _field(99, 3, b"") * 3 + _field(99, 4, b"") * 3 + _field(98, 0, _varint(2**40))
    decode(common_pb2.DissectionSpec.FromString, data)
