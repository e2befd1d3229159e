"""Occlusion and ablation as explainer methods on a planted layer, through the store and Ray."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from neurodissect.v1 import common_pb2, explainer_pb2

from services.common import result_store
from services.common.settings import Settings
from services.common.store import LocalStore
from services.explainer import occlusion, sharding
from services.explainer.explain_plan import plan_request
from services.explainer.methods import EXPLAINER_METHODS
from services.explainer.methods.occlusion import BLACK_FILL_NOTE
from services.explainer.servicer import explain
from tests.fixtures.planted_layer import OBJECTS, SCENES, TOP_QUANTILE, PlantedLayer, write_planted

OCCLUSION_KEY = "occlusion/test/conv.npz"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.shutdown()
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
    store: LocalStore, planted: PlantedLayer, spec: common_pb2.DissectionSpec, job: str,
    methods: list[str], **fields: object,
) -> None:
    request = explainer_pb2.ExplainRequest(
        job_id=job, layer=planted.layer, methods=methods, spec=spec,
        dataset_key=planted.dataset_key, acts_key=planted.acts_key, **fields,  # type: ignore[arg-type]
    )
    list(explain(Settings(store_url=store.url), store, plan_request(store, request,
                                                                     EXPLAINER_METHODS)))


def _planted_drops(planted: PlantedLayer) -> np.ndarray:
    """(U, 6) δ of the object concepts: −0.9 for a unit's own object, small elsewhere."""
    rng = np.random.default_rng(1)
    delta = -0.03 * rng.random((planted.n_units, len(OBJECTS)))
    for unit, label in enumerate(planted.planted):
        if label in OBJECTS:
            delta[unit, OBJECTS.index(label)] = -0.9 + 0.05 * rng.random()
    delta[planted.planted.index(SCENES[0]), :] = np.nan  # a unit silent on every region
    return delta.astype(np.float32)


def test_occlusion_matches_drops_with_netdissect(
    local_ray: None, store: LocalStore, planted: PlantedLayer
) -> None:
    store.put_arrays(OCCLUSION_KEY, {
        "labels": np.arange(1, len(OBJECTS) + 1, dtype=np.int32),
        "delta": _planted_drops(planted),
        "regions": np.full(len(OBJECTS), 7),
        "cost": np.array([60.0, 1.5]),
    })
    spec = common_pb2.DissectionSpec(
        netdissect=common_pb2.NetDissectParams(top_quantile=TOP_QUANTILE),
        occlusion=common_pb2.OcclusionParams(fill="black"),
    )
    _run(store, planted, spec, "occ", ["netdissect", "occlusion"], occlusion_key=OCCLUSION_KEY)
    rows = result_store.read_rows(store, "occ", planted.layer, "occlusion")
    for unit, label in enumerate(planted.planted):
        if label in OBJECTS:
            assert rows[unit]["top_concept"] == label and rows[unit]["matches_netdissect"]
            assert rows[unit]["own_drop"] >= 0.85
    summary = result_store.layer_summary(store, "occ", planted.layer, planted.n_units).occlusion
    assert (summary.fill, summary.concepts, summary.regions) == ("black", 6, 42)
    assert min(summary.correlation.values()) > 0.9 and summary.mean_correlation > 0.9
    assert summary.detectors_tested > 0 and summary.detectors_dropping == 1.0
    assert (summary.forward_passes, summary.seconds, summary.note) == (60, 1.5, BLACK_FILL_NOTE)
    exported = store.get(result_store.export_key("occ", planted.layer, "occlusion")).decode()
    table = list(csv.DictReader(io.StringIO(exported)))
    assert len(table) == planted.n_units and table[0]["top_concept"] == planted.planted[0]


def test_occlusion_needs_the_extractors_changes(
    local_ray: None, store: LocalStore, planted: PlantedLayer
) -> None:
    spec = common_pb2.DissectionSpec(occlusion=common_pb2.OcclusionParams())
    with pytest.raises(Exception, match="occlusion_key"):
        _run(store, planted, spec, "none", ["occlusion"], occlusion_key="occlusion/none.npz")


def test_concept_correlation_leaves_out_units_without_a_drop() -> None:
    drops = np.array([[0.9, np.nan], [0.1, 0.2], [0.0, 0.1], [np.nan, 0.3]])
    iou = np.array([[0.5, 0.9], [0.1, 0.0], [0.0, 0.1], [0.9, 0.2]])
    rho = occlusion.concept_correlations(drops, iou)
    assert rho[0] == pytest.approx(np.corrcoef([0.9, 0.1, 0.0], [0.5, 0.1, 0.0])[0, 1])
    assert rho[1] == pytest.approx(np.corrcoef([0.2, 0.1, 0.3], [0.0, 0.1, 0.2])[0, 1])
    assert occlusion.unit_drops(drops)[3] == [(1, 0.3)]
    assert occlusion.detectors_dropping(np.array([0.5, 0.05, np.nan]), 0.1) == (2, 0.5)


def _head(store: LocalStore, planted: PlantedLayer) -> explainer_pb2.AblationInputs:
    """A head whose class k (scene k) reads the scene units; the images' scenes as classes."""
    weight = np.zeros((len(SCENES), planted.n_units), dtype=np.float32)
    for unit, label in enumerate(planted.planted):
        if label in SCENES:
            weight[SCENES.index(label), unit] = 4.0
        weight[:, unit] += np.float32(0.1 * (unit % 3))
    store.put_arrays("heads/test/conv.npz", {"weight": weight, "bias": np.zeros(3, np.float32)})
    classes = np.concatenate([
        store.get_arrays(f"probe/{planted.dataset_key}/labels/i{i0}-{i0 + 40}.npz")["image"][:, 0]
        for i0 in range(0, planted.n_images, 40)
    ]) - (len(OBJECTS) + 1)
    store.put_array("probe/classes.npy", classes.astype(np.int64))
    return explainer_pb2.AblationInputs(head_key="heads/test/conv.npz",
                                        labels_key="probe/classes.npy")


def test_ablation_scores_each_method_and_says_why_a_layer_is_not_scored(
    local_ray: None, store: LocalStore, planted: PlantedLayer
) -> None:
    spec = common_pb2.DissectionSpec(
        netdissect=common_pb2.NetDissectParams(top_quantile=TOP_QUANTILE),
        linear=common_pb2.LinearParams(),
        simulation=common_pb2.SimulationParams(),
        ablation=common_pb2.AblationParams(variant="norm"),
    )
    _run(store, planted, spec, "abl", ["netdissect", "linear", "simulation", "ablation"],
         ablation=_head(store, planted))
    rows = result_store.read_rows(store, "abl", planted.layer, "ablation")
    scene_units = [u for u, label in enumerate(planted.planted) if label in SCENES]
    for unit in scene_units:  # read by the head and explained by their own scene
        assert rows[unit]["ablation"]["netdissect"] > 0.5, rows[unit]
    summary = result_store.layer_summary(store, "abl", planted.layer, planted.n_units)
    assert set(summary.ablation_mean) == {"linear", "netdissect"} and not summary.ablation_note
    assert "ablation" in summary.methods
    exported = store.get(result_store.export_key("abl", planted.layer, "ablation")).decode()
    assert exported.splitlines()[0] == "unit,linear,netdissect"

    note = "not scored: its pooled activations do not feed the classifier head directly"
    _run(store, planted, spec, "abl-none", ["netdissect", "ablation"],
         ablation=explainer_pb2.AblationInputs(note=note))
    none = result_store.layer_summary(store, "abl-none", planted.layer, planted.n_units)
    assert none.ablation_note == note and not none.ablation_mean
