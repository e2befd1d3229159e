"""The threshold sweep: per-threshold figures, and the job's own threshold reproduces NetDissect."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from neurodissect.v1 import common_pb2, explainer_pb2

from services.common import result_store
from services.common.errors import InvalidArgument
from services.common.settings import Settings
from services.common.store import LocalStore
from services.explainer import sharding
from services.explainer.explain_plan import plan_request
from services.explainer.methods import EXPLAINER_METHODS
from services.explainer.servicer import explain
from services.explainer.threshold_sweep import SweepPoint, sweep_points
from tests.fixtures.planted_layer import TOP_QUANTILE, PlantedLayer, write_planted


def test_sweep_points_count_detectors_labels_and_unchanged_units() -> None:
    labels = {
        0: [("sky", True), ("sky", True)],
        1: [("sky", True), ("car", False)],
        2: [("dog", False), ("dog", True)],
    }
    default = {0: "sky", 1: "car", 2: "dog"}
    assert sweep_points([0.01, 0.05], labels, default) == [
        SweepPoint(0.01, detectors=2, unique_labels=1, unchanged_fraction=2 / 3),
        SweepPoint(0.05, detectors=2, unique_labels=2, unchanged_fraction=1.0),
    ]


@pytest.fixture()
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture()
def planted(store: LocalStore) -> PlantedLayer:
    return write_planted(store, n_images=60, n_units=12, image_chunk=20, unit_block=6)


@pytest.fixture()
def local_ray() -> Iterator[None]:
    ray.shutdown()
    sharding.connect(Settings(ray_num_cpus=2))
    yield
    ray.shutdown()


def _explain(store: LocalStore, planted: PlantedLayer, spec: common_pb2.DissectionSpec,
             job: str) -> None:
    request = explainer_pb2.ExplainRequest(
        job_id=job, layer=planted.layer, spec=spec, dataset_key=planted.dataset_key,
        acts_key=planted.acts_key,
        methods=[m for m in EXPLAINER_METHODS if spec.HasField(m)],
    )
    plan = plan_request(store, request, EXPLAINER_METHODS)
    assert list(explain(Settings(store_url=store.url), store, plan))[-1].finished


@pytest.mark.parametrize(("mode", "thresholds", "own"), [
    ("all", [0.02, TOP_QUANTILE, 0.2], TOP_QUANTILE),
    ("per_image", [30.0, 50.0], 50.0),
])
def test_the_jobs_own_threshold_gives_netdissects_labels(
    local_ray: None, store: LocalStore, planted: PlantedLayer, mode: str,
    thresholds: list[float], own: float,
) -> None:
    spec = common_pb2.DissectionSpec(compute=common_pb2.ComputeSpec(unit_block_size=6))
    spec.netdissect.iou_mode = mode
    if mode == "per_image":
        spec.threshold_sweep.percentiles.extend(thresholds)
    else:
        spec.netdissect.top_quantile = TOP_QUANTILE
        spec.threshold_sweep.quantiles.extend(thresholds)
    _explain(store, planted, spec, mode)
    netdissect = result_store.read_rows(store, mode, planted.layer, "netdissect")
    rows = result_store.read_rows(store, mode, planted.layer, "threshold_sweep")
    at = thresholds.index(own)
    for u, row in rows.items():
        assert [p["threshold"] for p in row["sweep"]] == thresholds
        assert row["sweep"][at]["label"] == netdissect[u]["label"]
        assert row["sweep"][at]["iou"] == pytest.approx(netdissect[u]["iou"], abs=1e-12)
    summary = result_store.layer_summary(store, mode, planted.layer, planted.n_units)
    assert [p.threshold for p in summary.sweep] == thresholds
    assert summary.sweep[at].unchanged_fraction == 1.0
    assert summary.sweep[at].detectors == summary.detectors
    assert summary.sweep[at].unique_labels == summary.unique_labels
    text = result_store.read_export(store, mode, planted.layer, "sweep").decode()
    exported = list(csv.DictReader(io.StringIO(text)))
    assert [float(r["threshold"]) for r in exported] == thresholds
    assert {r["kind"] for r in exported} == {
        "image_percentile" if mode == "per_image" else "top_quantile"
    }


def test_each_mode_sweeps_its_own_thresholds() -> None:
    spec = common_pb2.DissectionSpec()
    spec.netdissect.iou_mode = "per_image"
    spec.threshold_sweep.quantiles.append(0.01)
    with pytest.raises(InvalidArgument) as err:
        EXPLAINER_METHODS["threshold_sweep"].params(spec)
    assert err.value.field == "spec.threshold_sweep.quantiles"
    spec.netdissect.iou_mode = "lite"
    spec.threshold_sweep.quantiles[0] = 1.5
    with pytest.raises(InvalidArgument) as err:
        EXPLAINER_METHODS["threshold_sweep"].params(spec)
    assert err.value.field == "spec.threshold_sweep.quantiles[0]"
