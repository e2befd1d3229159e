"""The CLI's spec flags, spec files and demo choices (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from neurodissect.v1 import common_pb2

from services.cli.main import build_parser, demo_layers, demo_spec, spec_from_args
from services.common.errors import InvalidArgument, NotFound
from services.gateway.client import load_spec


def parse(*argv: str) -> common_pb2.DissectionSpec:
    return spec_from_args(build_parser().parse_args(["submit", *argv]))


def test_flags_build_a_spec() -> None:
    spec = parse("--model-source", "torchvision", "--model", "resnet18", "--layers",
                 "layer3, layer4", "--dataset-kind", "broden", "--dataset-uri", "/data/broden",
                 "--methods", "netdissect,clip_dissect,simulation", "--clip-arch", "ViT-B-32",
                 "--clip-weights", "/w/clip.pt", "--batch-size", "16", "--name", "r18")
    assert list(spec.layers) == ["layer3", "layer4"]
    assert spec.model.name == "resnet18" and spec.dataset.uri == "/data/broden"
    assert spec.HasField("netdissect") and not spec.HasField("linear")
    assert spec.clip_dissect.clip.weights_uri == "/w/clip.pt"
    assert spec.simulation.simulator.arch == "ViT-B-32"
    assert spec.compute.batch_size == 16


def test_flags_override_a_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("model: {source: toy, name: toynet}\nlayers: [conv1]\n"
                    "netdissect: {top_quantile: 0.01, iou_mode: all}\n")
    spec = parse(str(path), "--layers", "conv2", "--milan-checkpoint", "toy")
    assert list(spec.layers) == ["conv2"]
    assert spec.netdissect.top_quantile == 0.01 and spec.netdissect.iou_mode == "all"
    assert spec.milan.checkpoint_uri == "toy"
    assert load_spec(path).layers == ["conv1"]


def test_spec_file_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text('{"netdissect": {"top_quantile": [1]}}')
    with pytest.raises(InvalidArgument) as err:
        load_spec(path)
    assert err.value.field == "netdissect.top_quantile"
    with pytest.raises(NotFound):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(InvalidArgument) as unknown:
        parse("--methods", "netdissect,magic")
    assert unknown.value.field == "methods"


def test_demo_dissects_the_last_spatial_top_level_layers() -> None:
    described = common_pb2.DescribeModelResponse(layers=[
        common_pb2.LayerInfo(name="conv1", shape=[8, 32, 32]),
        common_pb2.LayerInfo(name="conv2", shape=[16, 16, 16]),
        common_pb2.LayerInfo(name="conv2.relu", shape=[16, 16, 16]),
        common_pb2.LayerInfo(name="conv3", shape=[32, 8, 8]),
        common_pb2.LayerInfo(name="fc", shape=[10, 1, 1]),
    ])
    assert demo_layers(described) == ["conv2", "conv3"]
    spec = demo_spec(["conv3"], ["netdissect", "clip_dissect", "milan", "simulation"], 100, 32)
    assert spec.clip_dissect.clip.arch == "toy" and spec.milan.checkpoint_uri == "toy"
    assert spec.dataset.toyworld.n_images == 100 and not spec.HasField("linear")
