"""Validation of the compositional method's spatial mode: the gateway and the explainer agree."""

from __future__ import annotations

import pytest
from neurodissect.v1 import common_pb2

from services.common.errors import InvalidArgument
from services.common.settings import Settings
from services.explainer.methods.compositional import Compositional
from services.gateway.validation import SpecValidator
from tests.unit.explainer.test_compositional_spatial import SPATIAL_ENUMS


def _spec(**fields: object) -> common_pb2.DissectionSpec:
    spec = common_pb2.DissectionSpec(
        model=common_pb2.ModelSpec(source="toy", name="toynet"),
        layers=["conv"],
        dataset=common_pb2.DatasetSpec(kind="toyworld"),
    )
    spec.compositional.SetInParent()
    for name, value in fields.items():
        setattr(spec.compositional, name, value)
    return spec


def _refusal(spec: common_pb2.DissectionSpec) -> str | None:
    """The field the gateway's validation names in its refusal, None when it accepts."""

    def describe(model: common_pb2.ModelSpec) -> common_pb2.DescribeModelResponse:
        return common_pb2.DescribeModelResponse(
            layers=[common_pb2.LayerInfo(name="conv", shape=[20, 4, 4])]
        )

    try:
        SpecValidator(Settings(), describe).validate(spec)
    except InvalidArgument as error:
        return error.field
    return None


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"score": "iou"}, "score"),
        ({"abort_fraction": 0.2}, "abort_fraction"),
        ({"preset": "compexp"}, "preset"),
        ({"mode": "spatial", "operators": "near"}, "operators"),
        ({"mode": "spatial", "manual_fraction": 0.0}, "manual_fraction"),
        ({"mode": "spatial", "expansion_neighbours": 9}, "expansion_neighbours"),
        ({"mode": "spatial", "linear_length_penalty": 0.9}, "linear_length_penalty"),
        ({"mode": "spatial", "imrou_r": 1.5}, "imrou_r"),
    ],
)
def test_gateway_and_explainer_refuse_the_same_field(fields: dict, field: str) -> None:
    spec = _spec(**fields)
    assert _refusal(spec) == f"compositional.{field}"
    with pytest.raises(InvalidArgument) as refused:
        Compositional().params(spec)
    assert refused.value.field == f"spec.compositional.{field}"


@pytest.mark.parametrize(
    ("field", "value"), [(f, v) for f, values in SPATIAL_ENUMS.items() for v in values]
)
def test_the_gateway_accepts_every_spatial_enum_value(field: str, value: str) -> None:
    fields = {} if field in ("mode", "preset") else {"mode": "spatial"}
    assert _refusal(_spec(**fields, **{field: value})) is None
    assert _refusal(_spec(**fields, **{field: value + "x"})) == f"compositional.{field}"


def test_the_preset_s_spatial_fields_are_accepted_and_its_overrides_checked() -> None:
    assert _refusal(_spec(preset="indres", score="iou", beam=7)) is None
    assert _refusal(_spec(preset="indres", mode="boolean", score="iou")) == "compositional.score"
