"""NetDissect's per_image mode equals a direct per-image computation on the planted probe set."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from google.protobuf import json_format
from neurodissect.v1 import common_pb2, explainer_pb2
from PIL import Image

from services.common import keys, result_store
from services.common.activations import iter_units, read_manifest
from services.common.probe_format import read_concepts, read_label_chunk
from services.common.settings import Settings
from services.common.store import LocalStore
from services.explainer import sharding
from services.explainer.decoded_labels import grid_bands
from services.explainer.explain_plan import plan_request
from services.explainer.methods import EXPLAINER_METHODS
from services.explainer.per_image_iou import PerImageTally, dissect_per_image, image_thresholds
from services.explainer.servicer import explain
from services.explainer.unit_masks import decode_labels
from tests.fixtures.planted_layer import MASK, OBJECTS, RAW, PlantedLayer, write_planted

N_IMAGES, N_UNITS = 40, 9


@pytest.fixture()
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture()
def planted(store: LocalStore) -> PlantedLayer:
    return write_planted(store, n_images=N_IMAGES, n_units=N_UNITS, image_chunk=16, unit_block=4)


def _direct_mean_iou(store: LocalStore, planted: PlantedLayer, percentile: float) -> np.ndarray:
    """(U, L + 1) mean over the images holding c of IoU(resize(raw) > percentile(raw), L_c).

    Image by image with Pillow's bilinear resize; an image-level label covers its image.
    """
    manifest = read_manifest(store, planted.acts_key, planted.layer)
    table = read_concepts(store, planted.dataset_key)
    acts = np.concatenate([a for _, a in iter_units(store, manifest, 0, planted.n_units)])
    chunks = [read_label_chunk(store, planted.dataset_key, *r) for r in table.chunk_ranges()]
    pixel = np.concatenate([c.pixel for c in chunks])[:, 0]
    image = np.concatenate([c.image for c in chunks])
    width = table.max_label() + 1
    iou_sum = np.zeros((planted.n_units, width))
    holding = np.zeros(width)
    for i in range(planted.n_images):
        labels = {int(c): pixel[i] == c for c in np.unique(pixel[i]) if c}
        labels.update({int(c): np.ones((MASK, MASK), bool) for c in image[i] if c})
        for c in labels:
            holding[c] += 1
        for u in range(planted.n_units):
            raw = acts[i, u].astype(np.float32)
            cut = np.float32(np.percentile(raw, percentile))
            mask = np.asarray(Image.fromarray(raw).resize((MASK, MASK), Image.BILINEAR)) > cut
            for c, label in labels.items():
                iou_sum[u, c] += (mask & label).sum() / (mask | label).sum()
    return np.where(holding > 0, iou_sum / np.maximum(holding, 1), 0.0)


@pytest.mark.parametrize("percentile", [50.0, 85.0])
def test_mean_iou_equals_the_direct_per_image_computation(
    store: LocalStore, planted: PlantedLayer, percentile: float
) -> None:
    manifest = read_manifest(store, planted.acts_key, planted.layer)
    table = read_concepts(store, planted.dataset_key)
    direct = _direct_mean_iou(store, planted, percentile)
    band_start = grid_bands(table, (RAW, RAW))
    for u0, u1 in manifest.unit_ranges():
        tally = PerImageTally(u1 - u0, table.label_categories(), percentile, first_unit=u0)
        for i0, acts in iter_units(store, manifest, u0, u1):
            chunk = read_label_chunk(store, planted.dataset_key, i0, i0 + len(acts))
            tally.update(acts, decode_labels(chunk, table.label_categories(), band_start))
        counts = tally.result()
        np.testing.assert_allclose(counts.mean_iou(), direct[u0:u1], rtol=0, atol=1e-12)
        for d in dissect_per_image(counts, table):
            u = d.dissection.unit
            assert d.dissection.best.iou == pytest.approx(direct[u, 1:].max(), abs=1e-12)
            ranked = sorted(range(1, direct.shape[1]), key=lambda c: (-direct[u, c], c))
            assert [m.label for m in d.top_concepts] == [
                c for c in ranked[:3] if direct[u, c] >= 0.1
            ]
    # The planted object units are named by their label, with most of it inside the mask.
    assert direct.max() > 0.5


def test_an_all_zero_map_gives_empty_masks_at_every_percentile() -> None:
    acts = np.zeros((2, 1, 4, 4), dtype=np.float32)
    acts[1, 0, 1:3, 1:3] = 1.0
    for percentile in (0.0, 50.0, 90.0):
        thresholds = image_thresholds(acts, percentile)
        assert thresholds[0, 0] == 0.0 and not (acts[0] > thresholds[0, 0]).any()
    assert image_thresholds(acts, 50.0)[1, 0] == 0.0  # 12 of the 16 cells are 0


@pytest.fixture()
def local_ray() -> Iterator[None]:
    ray.shutdown()
    sharding.connect(Settings(ray_num_cpus=2))
    yield
    ray.shutdown()


def test_the_method_stores_the_direct_answer_and_its_top_concepts(
    local_ray: None, store: LocalStore, planted: PlantedLayer
) -> None:
    spec = common_pb2.DissectionSpec(compute=common_pb2.ComputeSpec(unit_block_size=4))
    spec.netdissect.iou_mode = "per_image"
    request = explainer_pb2.ExplainRequest(
        job_id="per-image", layer=planted.layer, methods=["netdissect"], spec=spec,
        dataset_key=planted.dataset_key, acts_key=planted.acts_key,
    )
    plan = plan_request(store, request, EXPLAINER_METHODS)
    assert list(explain(Settings(store_url=store.url), store, plan))[-1].finished
    direct = _direct_mean_iou(store, planted, 50.0)
    names = read_concepts(store, planted.dataset_key).label_names()
    units = {u.unit: u.netdissect for u in _unit_results(store, planted)}
    assert sorted(units) == list(range(planted.n_units))
    for u, found in units.items():
        assert math.isnan(found.threshold)
        assert found.iou == pytest.approx(direct[u, 1:].max(), abs=1e-12)
        ranked = sorted(range(1, direct.shape[1]), key=lambda c: (-direct[u, c], c))
        assert [(t.label, round(t.iou, 9)) for t in found.top_concepts] == [
            (names[c], round(direct[u, c], 9)) for c in ranked[:3] if direct[u, c] >= 0.1
        ]
    # At the median half of every map is on, so whole-image scene labels score about 0.5
    # everywhere; among the objects, each planted object unit's own label is the best.
    for u, label in enumerate(planted.planted):
        if label in OBJECTS:
            best = {c.category: c.label for c in units[u].per_category}
            assert best["object"] == label, u
    tally = result_store.read_export(store, "per-image", planted.layer, "tally").decode()
    assert len(tally.splitlines()) == planted.n_units + 1
    assert store.exists(keys.result_summary("per-image", planted.layer, "netdissect"))


def _unit_results(store: LocalStore, planted: PlantedLayer) -> list[common_pb2.UnitResult]:
    rows = result_store.read_rows(store, "per-image", planted.layer, "netdissect")
    out = []
    for unit, row in sorted(rows.items()):
        message = common_pb2.UnitResult(unit=unit)
        json_format.ParseDict({k: v for k, v in row.items() if k != "unit"}, message.netdissect)
        out.append(message)
    return out
