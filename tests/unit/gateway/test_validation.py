"""Spec validation: field paths, allowed values, codes, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from neurodissect.v1 import common_pb2

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.common.settings import Settings
from services.gateway.validation import SpecValidator, requested_methods, with_defaults

LAYERS = {"conv1": 16, "layer1.0.conv1": 32, "layer4": 512, "fc": 1000}


def describe(model: common_pb2.ModelSpec) -> common_pb2.DescribeModelResponse:
    if model.name != "resnet18":
        raise NotFound(f"unknown model {model.name!r}", field="model.name")
    return common_pb2.DescribeModelResponse(layers=[
        common_pb2.LayerInfo(name=name, shape=[units, 7, 7]) for name, units in LAYERS.items()
    ])


def good() -> common_pb2.DissectionSpec:
    return common_pb2.DissectionSpec(
        model=common_pb2.ModelSpec(source="torchvision", name="resnet18"),
        layers=["layer4", "conv1"],
        dataset=common_pb2.DatasetSpec(kind="toyworld"),
    )


@pytest.fixture()
def validator() -> SpecValidator:
    return SpecValidator(Settings(), describe)


def test_a_good_spec_passes_and_gets_netdissect_by_default(validator: SpecValidator) -> None:
    spec, described = validator.validate(good())
    assert requested_methods(spec) == ["netdissect"]
    assert len(described.layers) == len(LAYERS)


def test_explicit_methods_are_kept() -> None:
    spec = good()
    spec.linear.SetInParent()
    spec.simulation.SetInParent()
    assert requested_methods(with_defaults(spec)) == ["linear", "simulation"]
    only_simulation = good()
    only_simulation.simulation.SetInParent()
    assert requested_methods(with_defaults(only_simulation)) == ["netdissect", "simulation"]


def test_a_misspelled_layer_names_close_matches(validator: SpecValidator) -> None:
    spec = good()
    spec.layers[1] = "layr4"
    spec.layers[0] = "conv1"
    with pytest.raises(InvalidArgument) as err:
        validator.validate(spec)
    assert err.value.field == "layers[1]"
    assert "did you mean 'layer4'" in str(err.value)


def test_allowed_values_are_listed(validator: SpecValidator) -> None:
    spec = good()
    spec.netdissect.iou_mode = "max"
    with pytest.raises(InvalidArgument) as err:
        validator.validate(spec)
    assert str(err.value) == (
        "netdissect.iou_mode: 'max' is not allowed; use one of 'lite', 'netdissect', 'all',"
        " 'per_image' (empty: the default)"
    )


@pytest.mark.parametrize(("path", "value", "error", "field"), [
    ("compositional.beam", -1, InvalidArgument, "compositional.beam"),
    ("compositional.top_quantile", 1.0, InvalidArgument, "compositional.top_quantile"),
    ("linear.concepts", "words", InvalidArgument, "linear.concepts"),
    ("linear.max_concepts", 1000, InvalidArgument, "linear.max_concepts"),
    ("milan.mask_quantile", -0.5, InvalidArgument, "milan.mask_quantile"),
    ("netdissect.image_percentile", 50.0, InvalidArgument, "netdissect.image_percentile"),
    ("compute.activation_dtype", "int8", InvalidArgument, "compute.activation_dtype"),
    ("compute.image_chunk_size", -3, InvalidArgument, "compute.image_chunk_size"),
    ("dataset.toyworld.image_size", 4, InvalidArgument, "dataset.toyworld.image_size"),
    ("model.preprocessing", "caffe", InvalidArgument, "model.preprocessing"),
    ("model.input_size", -224, InvalidArgument, "model.input_size"),
    ("name", "x" * 1000, InvalidArgument, "name"),
    ("model.name", "vgg99", NotFound, "model.name"),
])
def test_bad_fields(
    validator: SpecValidator, path: str, value: object, error: type[Exception], field: str
) -> None:
    spec = good()
    *parents, leaf = path.split(".")
    target = spec
    for part in parents:
        target = getattr(target, part)
    if path == "milan.mask_quantile":
        spec.milan.checkpoint_uri = "toy"
    if path == "netdissect.image_percentile":  # refused outside the per_image mode
        spec.netdissect.iou_mode = "lite"
    setattr(target, leaf, value)
    with pytest.raises(error) as err:
        validator.validate(spec)
    assert err.value.field == field  # type: ignore[attr-defined]


def test_the_image_percentile_is_a_percent_of_the_per_image_mode(
    validator: SpecValidator,
) -> None:
    spec = good()
    spec.netdissect.iou_mode = "per_image"
    spec.netdissect.image_percentile = 30.0
    validator.validate(spec)
    spec.netdissect.image_percentile = 100.5
    with pytest.raises(InvalidArgument) as err:
        validator.validate(spec)
    assert err.value.field == "netdissect.image_percentile"


def test_le_clip_needs_a_clip_model(validator: SpecValidator) -> None:
    spec = good()
    spec.linear.concepts = "clip"
    with pytest.raises(InvalidArgument) as err:
        validator.validate(spec)
    assert err.value.field == "linear.clip"
    spec.clip_dissect.clip.arch = "toy"
    validator.validate(spec)


def test_too_many_units_are_refused(validator: SpecValidator) -> None:
    settings = Settings()
    big = SpecValidator(settings, lambda model: common_pb2.DescribeModelResponse(layers=[
        common_pb2.LayerInfo(name=f"l{i}", shape=[100_000, 1, 1]) for i in range(3)]))
    spec = good()
    del spec.layers[:]
    spec.layers.extend(["l0", "l1", "l2"])
    with pytest.raises(ResourceExhausted) as err:
        big.validate(spec)
    assert err.value.field == "layers"


def test_paths_must_exist_and_stay_under_the_data_roots(tmp_path: Path) -> None:
    inside = tmp_path / "data" / "broden"
    inside.mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    validator = SpecValidator(Settings(data_roots=str(tmp_path / "data")), describe)
    spec = good()
    spec.dataset.kind = "broden"
    spec.dataset.uri = f"file://{inside}"
    validator.validate(spec)
    spec.dataset.uri = str(outside)
    with pytest.raises(InvalidArgument, match="outside the allowed data roots"):
        validator.validate(spec)
    spec.dataset.uri = f"{inside}/../broden"
    with pytest.raises(InvalidArgument, match=r"may not contain '\.\.'"):
        validator.validate(spec)
    spec.dataset.uri = str(tmp_path / "data" / "missing")
    with pytest.raises(NotFound):
        validator.validate(spec)


def test_the_checks_of_netdissects_labels_are_validated(validator: SpecValidator) -> None:
    spec = good()
    spec.significance.SetInParent()
    spec.threshold_sweep.SetInParent()
    checked, _ = validator.validate(spec)
    assert checked.HasField("netdissect")  # the default method, whose labels they check
    spec.compositional.SetInParent()
    with pytest.raises(InvalidArgument) as err:
        validator.validate(spec)
    assert err.value.field == "threshold_sweep"
    for path, value, field in [
        ("threshold_sweep.quantiles", [0.01, 1.0], "threshold_sweep.quantiles[1]"),
        ("threshold_sweep.percentiles", [50.0], "threshold_sweep.percentiles"),
        ("significance.q", 0.0, "significance.q"),
        ("significance.permutations", 10_001, "significance.permutations"),
    ]:
        spec = good()
        spec.netdissect.SetInParent()
        *parents, leaf = path.split(".")
        target = getattr(spec, parents[0])
        if isinstance(value, list):
            getattr(target, leaf).extend(value)
        else:
            setattr(target, leaf, value)
        with pytest.raises(InvalidArgument) as err:
            validator.validate(spec)
        assert err.value.field == field, path
    spec = good()
    spec.netdissect.iou_mode = "per_image"
    spec.threshold_sweep.percentiles.extend([0.0, 90.0])
    validator.validate(spec)
