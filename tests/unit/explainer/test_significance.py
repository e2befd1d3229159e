"""Detector significance: the analytic null, its calibration on random masks, planted units."""

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
from services.common.errors import InvalidArgument
from services.common.probe_format import read_concepts, read_label_chunk
from services.common.settings import Settings
from services.common.store import LocalStore
from services.explainer import sharding
from services.explainer.explain_plan import plan_request
from services.explainer.methods import EXPLAINER_METHODS
from services.explainer.servicer import explain
from services.explainer.significance import (
    GridOverlapTally,
    benjamini_hochberg,
    null_moments,
    permutation_p,
    upper_p,
    z_scores,
)
from services.explainer.spatial_masks import Grid, label_grid_masks
from tests.fixtures.planted_layer import OBJECTS, RAW, TOP_QUANTILE, PlantedLayer, write_planted


def test_null_moments_equal_a_monte_carlo_placement() -> None:
    cells, n, labels = 9, np.array([[2], [5], [0], [9]]), np.array([[3], [4], [6], [2]])
    mean, variance = null_moments(n, labels, cells)
    rng = np.random.default_rng(0)
    draws = 200_000
    total = np.zeros(draws)
    for n_i, l_i in zip(n[:, 0], labels[:, 0], strict=True):
        label = np.zeros(cells, bool)
        label[:l_i] = True
        # n_i cells placed uniformly at random: the first n_i of a random permutation.
        placed = np.argsort(rng.random((draws, cells)), axis=1)[:, :n_i]
        total += label[placed].sum(axis=1)
    assert mean[0, 0] == pytest.approx(2 * 3 / 9 + 5 * 4 / 9 + 0 + 9 * 2 / 9)
    assert total.mean() == pytest.approx(mean[0, 0], abs=0.01)
    assert total.var() == pytest.approx(variance[0, 0], rel=0.02)


def test_benjamini_hochberg_cutoff() -> None:
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    # k q / m at q = 0.05, m = 10: 0.005, 0.01, 0.015, ...: the first two pass.
    assert benjamini_hochberg(p, 0.05) == 0.008
    assert benjamini_hochberg(np.array([0.5, 0.9]), 0.05) == -1.0
    assert benjamini_hochberg(np.zeros(0), 0.05) == -1.0


def _planted_grids(store: LocalStore, planted: PlantedLayer) -> tuple[np.ndarray, Grid]:
    table = read_concepts(store, planted.dataset_key)
    labels = np.array(sorted(c.number for c in table.labels))
    grid = Grid(RAW, RAW)
    masks = np.concatenate([
        label_grid_masks(chunk.pixel, chunk.image, labels, grid)
        for chunk in (read_label_chunk(store, planted.dataset_key, *r)
                      for r in table.chunk_ranges())
    ], axis=1)
    return masks, grid


@pytest.fixture()
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture()
def planted(store: LocalStore) -> PlantedLayer:
    return write_planted(store)


def test_random_masks_rarely_pass_and_their_z_is_standard(
    store: LocalStore, planted: PlantedLayer
) -> None:
    """A unit firing on the top 20% of i.i.d. noise: its masks are independent of the labels."""
    masks, grid = _planted_grids(store, planted)
    passed = tested = 0
    zs = []
    for seed in range(50):
        noise = np.random.default_rng(seed).random((planted.n_images, 1, RAW, RAW))
        tally = GridOverlapTally(1, masks, grid)
        tally.update(0, noise > np.quantile(noise, 0.8))
        o = tally.result(np.array([-1]))
        z = z_scores(o.intersection, o.expected, o.variance)[0]
        p = upper_p(z)[o.variance[0] > 0]
        tested += len(p)
        passed += int((p <= benjamini_hochberg(p, 0.05)).sum())
        zs.extend(z[~np.isnan(z)])
    assert tested >= 50 * len(OBJECTS)  # whole-image scene labels have no variance
    assert passed / tested < 0.05
    # Calibration: z ≈ N(0, 1) less the continuity correction (about 0.2 σ here).
    assert -0.5 < np.mean(zs) < 0.1 and 0.8 < np.std(zs) < 1.2


def test_the_permutation_check_stays_calibrated_on_spatially_coherent_random_masks(
    store: LocalStore, planted: PlantedLayer
) -> None:
    """Random 2×2 blocks, independent of the labels: uniform placement overstates them."""
    masks, grid = _planted_grids(store, planted)
    low = checked = inflated = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        blocks = np.zeros((planted.n_images, 1, RAW, RAW), bool)
        for i, (y, x) in enumerate(rng.integers(0, RAW - 1, size=(planted.n_images, 2))):
            blocks[i, 0, y : y + 2, x : x + 2] = True
        tally = GridOverlapTally(1, masks, grid)
        tally.update(0, blocks)
        o = tally.result(np.array([-1]))
        z = z_scores(o.intersection, o.expected, o.variance)[0]
        for k in np.flatnonzero(o.variance[0] > 0):
            p = permutation_p(grid.pack(blocks[:, 0]), masks[k], 99, rng)
            low += p <= 0.05
            checked += 1
            inflated += z[k] > 1.645
    assert checked >= 20 * len(OBJECTS)
    assert low / checked < 0.1  # about 5%
    assert inflated / checked > 0.15  # the placement null's 5% tail holds about 29%


def test_the_permutation_check_sees_a_unit_equal_to_a_label_and_not_a_shuffled_one() -> None:
    rng = np.random.default_rng(1)
    grid = Grid(3, 3)
    label = grid.pack(rng.random((60, 3, 3)) < 0.3)
    assert permutation_p(label, label, 99, np.random.default_rng(0)) == 0.01
    shuffled = label[rng.permutation(60)]
    assert permutation_p(shuffled, label, 99, np.random.default_rng(0)) > 0.05


@pytest.fixture()
def local_ray() -> Iterator[None]:
    ray.shutdown()
    sharding.connect(Settings(ray_num_cpus=2))
    yield
    ray.shutdown()


def _explain(store: LocalStore, planted: PlantedLayer, spec: common_pb2.DissectionSpec,
             job: str) -> None:
    request = explainer_pb2.ExplainRequest(
        job_id=job, layer=planted.layer, methods=[m for m in EXPLAINER_METHODS
                                                  if spec.HasField(m)],
        spec=spec, dataset_key=planted.dataset_key, acts_key=planted.acts_key,
    )
    plan = plan_request(store, request, EXPLAINER_METHODS)
    assert list(explain(Settings(store_url=store.url), store, plan))[-1].finished


def test_planted_units_pass_with_tiny_p_values(
    local_ray: None, store: LocalStore, planted: PlantedLayer
) -> None:
    spec = common_pb2.DissectionSpec(compute=common_pb2.ComputeSpec(unit_block_size=8))
    spec.netdissect.top_quantile = TOP_QUANTILE
    spec.significance.permutations = 200
    _explain(store, planted, spec, "sig")
    netdissect = result_store.read_rows(store, "sig", planted.layer, "netdissect")
    rows = result_store.read_rows(store, "sig", planted.layer, "significance")
    assert sorted(rows) == list(range(planted.n_units))
    for u, label in enumerate(planted.planted):
        row = rows[u]
        assert row["label"] == netdissect[u]["label"]
        if label in OBJECTS:
            assert row["label"] == label and row["significant"], (u, row)
            # p underflows to 0 (a default, so absent from the row) for the largest z
            assert row.get("p_value", 0.0) < 1e-6 and row["z"] > 5
            assert row["iou"] > row["expected_iou"]
            assert row["permutation_p"] == pytest.approx(1 / 201)
        else:  # a scene: tested by shuffling the unit's mask areas across images
            assert row["label"] == label and row["significant"] and row["z"] > 5, (u, row)
    summary = result_store.layer_summary(store, "sig", planted.layer, planted.n_units)
    detectors = {u for u, r in netdissect.items() if r.get("detector")}
    significant = {u for u, r in rows.items() if r.get("significant")}
    assert summary.significant_detectors == len(detectors & significant) > 0
    text = result_store.read_export(store, "sig", planted.layer, "significance").decode()
    exported = list(csv.DictReader(io.StringIO(text)))
    assert [int(r["unit"]) for r in exported] == list(range(planted.n_units))


def test_significance_needs_netdissect_and_a_rate_inside_zero_one() -> None:
    spec = common_pb2.DissectionSpec()
    spec.significance.SetInParent()
    with pytest.raises(InvalidArgument) as err:
        EXPLAINER_METHODS["significance"].params(spec)
    assert err.value.field == "spec.significance"
    spec.netdissect.SetInParent()
    spec.significance.q = 1.0
    with pytest.raises(InvalidArgument) as err:
        EXPLAINER_METHODS["significance"].params(spec)
    assert err.value.field == "spec.significance.q"


def test_whole_image_labels_are_tested_by_shuffling_the_mask_areas_across_images() -> None:
    grid = Grid(2, 2)
    rng = np.random.default_rng(3)
    n_images = 12
    holds = rng.random(n_images) < 0.4
    label = grid.pack(np.broadcast_to(holds[:, None, None], (n_images, 2, 2)))[None]
    masks = rng.random((n_images, 1, 2, 2)) < 0.5
    tally = GridOverlapTally(1, label, grid)
    tally.update(0, masks)
    o = tally.result(np.array([0]))
    areas = masks.reshape(n_images, -1).sum(axis=1)
    draws = np.array([areas[rng.permutation(n_images)][holds].sum() for _ in range(100_000)])
    assert o.intersection[0, 0] == areas[holds].sum()
    assert o.expected[0, 0] == pytest.approx(draws.mean(), abs=0.02)
    assert o.variance[0, 0] == pytest.approx(draws.var(), rel=0.02)
