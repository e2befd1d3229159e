"""Malformed and hostile specs, each with the status code and field it must be refused with.

Each case turns a valid spec (at least two layers) into a bad one, in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from neurodissect.v1 import common_pb2

Spec = common_pb2.DissectionSpec
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class Hostile:
    name: str
    spoil: Callable[[Spec], None]
    code: grpc.StatusCode
    field: str


def _set(path: str, value: object) -> Callable[[Spec], None]:
    def spoil(spec: Spec) -> None:
        *parents, leaf = path.split(".")
        target = spec
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, value)

    return spoil


def _sweep(quantiles: list[float]) -> Callable[[Spec], None]:
    def spoil(spec: Spec) -> None:
        spec.threshold_sweep.quantiles.extend(quantiles)

    return spoil


def _layers(names: list[str]) -> Callable[[Spec], None]:
    def spoil(spec: Spec) -> None:
        del spec.layers[:]
        spec.layers.extend(names)

    return spoil


def _misspell_second_layer(spec: Spec) -> None:
    spec.layers[1] = spec.layers[1][0] + spec.layers[1]


def _duplicate_layer(spec: Spec) -> None:
    spec.layers[1] = spec.layers[0]


def _broden(uri: str) -> Callable[[Spec], None]:
    def spoil(spec: Spec) -> None:
        spec.dataset.kind = "broden"
        spec.dataset.uri = uri

    return spoil


def _clip_similarity(spec: Spec) -> None:
    spec.clip_dissect.clip.arch = "toy"
    spec.clip_dissect.similarity = "dot_product"


def _milan_without_checkpoint(spec: Spec) -> None:
    spec.milan.SetInParent()
    spec.milan.checkpoint_uri = ""


HOSTILE: list[Hostile] = [
    Hostile("unknown model", _set("model.name", "nosuchnet"), NOT_FOUND, "model.name"),
    Hostile("unknown model source", _set("model.source", "caffe"), INVALID, "model.source"),
    Hostile("no layers", _layers([]), INVALID, "layers"),
    Hostile("misspelled layer", _misspell_second_layer, INVALID, "layers[1]"),
    Hostile("duplicate layer", _duplicate_layer, INVALID, "layers[1]"),
    Hostile("layer with a path", _layers(["../../etc"]), INVALID, "layers[0]"),
    Hostile("too many layers", _layers([f"l{i}" for i in range(500)]), EXHAUSTED, "layers"),
    Hostile("quantile above 1", _set("netdissect.top_quantile", 1.5), INVALID,
            "netdissect.top_quantile"),
    Hostile("quantile 0", _set("netdissect.top_quantile", 0.0), INVALID,
            "netdissect.top_quantile"),
    Hostile("NaN detector threshold", _set("netdissect.detector_threshold", math.nan), INVALID,
            "netdissect.detector_threshold"),
    Hostile("unknown iou_mode", _set("netdissect.iou_mode", "median"), INVALID,
            "netdissect.iou_mode"),
    Hostile("image percentile outside per_image", _set("netdissect.image_percentile", 50.0),
            INVALID, "netdissect.image_percentile"),
    Hostile("NaN significance rate", _set("significance.q", math.nan), INVALID,
            "significance.q"),
    Hostile("huge permutation count", _set("significance.permutations", 2_000_000_000),
            INVALID, "significance.permutations"),
    Hostile("sweep quantile above 1", _sweep([0.01, 7.0]), INVALID,
            "threshold_sweep.quantiles[1]"),
    Hostile("unknown similarity", _clip_similarity, INVALID, "clip_dissect.similarity"),
    Hostile("negative batch size", _set("compute.batch_size", -8), INVALID, "compute.batch_size"),
    Hostile("huge unit block", _set("compute.unit_block_size", 2_000_000_000), INVALID,
            "compute.unit_block_size"),
    Hostile("bad device", _set("compute.device", "tpu:0"), INVALID, "compute.device"),
    Hostile("unknown dataset kind", _set("dataset.kind", "coco"), INVALID, "dataset.kind"),
    Hostile("empty dataset path", _broden(""), INVALID, "dataset.uri"),
    Hostile("dataset path with ..", _broden("/tmp/../etc"), INVALID, "dataset.uri"),
    Hostile("missing dataset", _broden("/nonexistent/broden1_224"), NOT_FOUND, "dataset.uri"),
    Hostile("remote dataset URL", _broden("http://example.invalid/broden"), INVALID,
            "dataset.uri"),
    Hostile("weights path with ..", _set("model.weights_uri", "../weights.pt"), INVALID,
            "model.weights_uri"),
    Hostile("missing weights", _set("model.weights_uri", "/nonexistent/w.pt"), NOT_FOUND,
            "model.weights_uri"),
    Hostile("milan without checkpoint", _milan_without_checkpoint, INVALID,
            "milan.checkpoint_uri"),
    Hostile("negative image limit", _set("dataset.limit", -1), INVALID, "dataset.limit"),
]
