"""The method contract end to end on a planted layer: exports, summaries, the spec vocabulary."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from neurodissect.v1 import common_pb2, explainer_pb2
from PIL import Image

from services.common import keys, result_store
from services.common.activations import read_manifest, read_pooled
from services.common.errors import InvalidArgument
from services.common.probe_format import read_concepts, read_label_chunk
from services.common.settings import Settings
from services.common.spec_vocabulary import (
    IOU_MODES,
    LINEAR_CONCEPTS,
    POOLINGS,
    SCORING_METHOD,
    SIMILARITIES,
)
from services.common.store import LocalStore
from services.explainer import sharding
from services.explainer.explain_plan import plan_request
from services.explainer.methods import EXPLAINER_METHODS
from services.explainer.servicer import explain
from services.gateway.validation import SpecValidator
from tests.fixtures.planted_layer import MASK, RAW, TOP_QUANTILE, PlantedLayer, write_planted


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.shutdown()  # a Ray left connected by another module would be reused
    sharding.connect(Settings(ray_num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture()
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture()
def planted(store: LocalStore) -> PlantedLayer:
    return write_planted(store)


def _run(
    store: LocalStore, planted: PlantedLayer, spec: common_pb2.DissectionSpec, job: str
) -> list[explainer_pb2.ExplainProgress]:
    methods = [m for m in EXPLAINER_METHODS if spec.HasField(m)]
    request = explainer_pb2.ExplainRequest(
        job_id=job,
        layer=planted.layer,
        methods=methods,
        spec=spec,
        dataset_key=planted.dataset_key,
        acts_key=planted.acts_key,
        clip_dissect=planted.clip,
        linear=planted.clip,
    )
    plan = plan_request(store, request, EXPLAINER_METHODS)
    return list(explain(Settings(store_url=store.url), store, plan))


def _recount(
    store: LocalStore, planted: PlantedLayer, thresholds: dict[int, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Σ|L_c| (L,), Σ|M_u| over all images (U,), Σ|M_u ∩ L_c| (U, L), counted image by image.

    M_u is the unit's raw map resized to the mask plane by Pillow's bilinear filter,
    above the unit's threshold; an image-level label covers its whole image.
    """
    manifest = read_manifest(store, planted.acts_key, planted.layer)
    table = read_concepts(store, planted.dataset_key)
    n_labels = len(table.labels) + 1
    truth = np.zeros(n_labels, dtype=np.int64)
    activation = np.zeros(planted.n_units, dtype=np.int64)
    intersect = np.zeros((planted.n_units, n_labels), dtype=np.int64)
    chunks = [read_label_chunk(store, planted.dataset_key, *r) for r in table.chunk_ranges()]
    pixel = np.concatenate([chunk.pixel for chunk in chunks])
    image = np.concatenate([chunk.image for chunk in chunks])
    acts = np.concatenate([
        np.concatenate([
            store.get_array(keys.acts_chunk(planted.acts_key, planted.layer, u0, u1, i0, i1))
            for u0, u1 in manifest.unit_ranges()
        ], axis=1)
        for i0, i1 in manifest.image_ranges()
    ]).astype(np.float32)
    assert acts.shape[2:] == (RAW, RAW)
    for i in range(planted.n_images):
        present = [np.asarray(pixel[i, 0] == c) for c in range(n_labels)]
        for c in range(1, n_labels):
            whole = c in image[i]
            truth[c] += MASK * MASK if whole else present[c].sum()
        for u in range(planted.n_units):
            resized = Image.fromarray(acts[i, u]).resize((MASK, MASK), Image.BILINEAR)
            mask = np.asarray(resized) > thresholds[u]
            activation[u] += mask.sum()
            for c in range(1, n_labels):
                whole = c in image[i]
                intersect[u, c] += mask.sum() if whole else (mask & present[c]).sum()
    return truth, activation, intersect


def test_the_tally_export_holds_the_pixel_counts_of_an_independent_recount(
    local_ray: None, store: LocalStore, planted: PlantedLayer
) -> None:
    spec = common_pb2.DissectionSpec(compute=common_pb2.ComputeSpec(unit_block_size=7))
    spec.netdissect.top_quantile = TOP_QUANTILE
    spec.netdissect.iou_mode = "all"
    _run(store, planted, spec, "tally")
    rows = result_store.read_rows(store, "tally", planted.layer, "netdissect")
    thresholds = {u: float(row["threshold"]) for u, row in rows.items()}
    truth, activation, intersect = _recount(store, planted, thresholds)
    number = {c.name: c.number for c in read_concepts(store, planted.dataset_key).labels}

    text = result_store.read_export(store, "tally", planted.layer, "tally").decode()
    tally = list(csv.DictReader(io.StringIO(text)))
    assert sorted(int(r["unit"]) for r in tally) == list(range(1, planted.n_units + 1))
    checked = 0
    for row in tally:
        u = int(row["unit"]) - 1
        for category in ("object", "scene"):
            label = number[row[f"{category}-label"]]
            assert int(row[f"{category}-truth"]) == truth[label]
            assert int(row[f"{category}-activation"]) == activation[u]
            assert int(row[f"{category}-intersect"]) == intersect[u, label]
            checked += 1
    assert checked == 2 * planted.n_units and intersect.sum() > 0


def test_layer_summaries_come_from_each_method_through_the_store(
    local_ray: None, store: LocalStore, planted: PlantedLayer
) -> None:
    spec = common_pb2.DissectionSpec(compute=common_pb2.ComputeSpec(unit_block_size=8))
    spec.netdissect.top_quantile = TOP_QUANTILE
    spec.clip_dissect.SetInParent()
    spec.simulation.SetInParent()
    progress = _run(store, planted, spec, "summary")
    rows = result_store.read_rows(store, "summary", planted.layer, "netdissect")
    detectors = [r for r in rows.values() if r.get("detector")]

    summary = result_store.layer_summary(store, "summary", planted.layer, planted.n_units)
    assert list(summary.methods) == ["netdissect", "clip_dissect", "simulation"]
    assert summary.units == planted.n_units
    assert summary.detectors == len(detectors) > 0
    assert summary.unique_labels == len({r["label"] for r in detectors})
    assert set(summary.simulation_mean) == {"netdissect", "clip_dissect"}
    # every slow step names itself before it runs
    messages = [p.message for p in progress if p.method == "clip_dissect"]
    assert "concept probabilities P̃ of the probe images" in messages
    assert messages.index("the layer's similarity and concept ranking") < messages.index(
        "units 0-8"
    )
    assert "layer summary and exports" in messages
    clip_csv = result_store.read_export(store, "summary", planted.layer, "clip_dissect").decode()
    assert clip_csv.splitlines()[0] == "layer,unit,description,similarity"
    assert len(clip_csv.splitlines()) == planted.n_units + 1
    # Simulation's scatter sample: each unit's actual pooled mean on sampled test images
    # beside every method's prediction there, for the unit page's plot.
    mean, _ = read_pooled(store, planted.acts_key, planted.layer)
    for unit in (0, planted.n_units - 1):
        sample = result_store.read_sample(store, "summary", planted.layer, "simulation", unit)
        assert sample is not None
        images = sample["images"]
        assert list(sample["methods"]) == ["clip_dissect", "netdissect"]
        assert 0 < len(images) <= result_store.SAMPLE_IMAGES
        assert np.all(np.diff(images) > 0)
        np.testing.assert_allclose(sample["actual"], mean[images, unit], rtol=1e-6)
        assert sample["predicted"].shape == (2, len(images))
    assert result_store.read_sample(store, "summary", planted.layer, "simulation",
                                    planted.n_units) is None


def _gateway_accepts(field: str, value: str) -> bool:
    """Whether the gateway's validation accepts `value` for `field` (`method.name`)."""
    spec = common_pb2.DissectionSpec(
        model=common_pb2.ModelSpec(source="toy", name="toynet"),
        layers=["conv"],
        dataset=common_pb2.DatasetSpec(kind="toyworld"),
    )
    method, name = field.split(".")
    setattr(getattr(spec, method), name, value)
    if method == "clip_dissect" or value == "clip":
        spec.clip_dissect.clip.arch = "toy"

    def describe(model: common_pb2.ModelSpec) -> common_pb2.DescribeModelResponse:
        return common_pb2.DescribeModelResponse(
            layers=[common_pb2.LayerInfo(name="conv", shape=[20, RAW, RAW])]
        )

    try:
        SpecValidator(Settings(), describe).validate(spec)
    except InvalidArgument:
        return False
    return True


ENUMS = {
    "netdissect.iou_mode": IOU_MODES,
    "clip_dissect.similarity": SIMILARITIES,
    "clip_dissect.pooling": POOLINGS,
    "linear.concepts": LINEAR_CONCEPTS,
}


def test_the_gateway_accepts_exactly_the_vocabulary() -> None:
    for field, values in ENUMS.items():
        assert all(_gateway_accepts(field, v) for v in values), field
    assert not _gateway_accepts("clip_dissect.similarity", "rank_reorder")
    assert not _gateway_accepts("netdissect.iou_mode", "mean")


@pytest.mark.parametrize(
    ("field", "value"), [(f, v) for f, values in ENUMS.items() for v in values]
)
def test_every_enum_value_the_gateway_accepts_runs_to_completion(
    local_ray: None, store: LocalStore, planted: PlantedLayer, field: str, value: str
) -> None:
    assert _gateway_accepts(field, value)
    method, name = field.split(".")
    spec = common_pb2.DissectionSpec(compute=common_pb2.ComputeSpec(unit_block_size=8))
    setattr(getattr(spec, method), name, value)
    spec.simulation.SetInParent()
    job = f"{method}-{value}"
    progress = _run(store, planted, spec, job)
    assert progress[-1].finished
    for ran in (method, SCORING_METHOD):
        assert result_store.covered(store, job, planted.layer, ran, planted.n_units)
