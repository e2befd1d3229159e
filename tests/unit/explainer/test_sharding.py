"""Ray sharding of the explainer: unit blocks, retries, cancellation, block-size invariance,
restarts that skip stored blocks. One local Ray (2 CPUs) is shared by the module."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from neurodissect.v1 import common_pb2, explainer_pb2
from prometheus_client import REGISTRY

from services.common import keys, result_store
from services.common.errors import (
    Cancelled,
    InvalidArgument,
    NotFound,
    StoreError,
    Unavailable,
)
from services.common.settings import Settings
from services.common.store import LocalStore
from services.explainer import sharding
from services.explainer.explain_plan import plan_request
from services.explainer.methods import EXPLAINER_METHODS
from services.explainer.servicer import explain
from services.explainer.sharding import BlockOutcome, attempt_number, gather, unit_blocks
from tests.fixtures.planted_layer import OBJECTS, TOP_QUANTILE, PlantedLayer, write_planted

ALL_METHODS = ["netdissect", "compositional", "clip_dissect", "linear", "simulation"]


def test_unit_blocks_follow_the_grid_of_the_block_size() -> None:
    assert unit_blocks(0, 20, 7) == [(0, 7), (7, 14), (14, 20)]
    assert unit_blocks(10, 140, 64) == [(10, 64), (64, 128), (128, 140)]
    assert unit_blocks(3, 4, 1) == [(3, 4)]
    assert unit_blocks(5, 5, 64) == []
    with pytest.raises(ValueError):
        unit_blocks(0, 10, 0)


class _FlakyRay:
    """ray.init failing `failures` times, then succeeding; records the waits between."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.waits: list[float] = []

    def init(self, **_: object) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("Starting Ray client server failed")

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


def _use(flaky: _FlakyRay, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", flaky.init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    # sharding's own view of the clock: its waits are recorded, not slept
    clock = SimpleNamespace(monotonic=time.monotonic, sleep=flaky.sleep)
    monkeypatch.setattr(sharding, "time", clock)


def test_a_cluster_is_retried_with_backoff_until_it_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flaky = _FlakyRay(failures=2)
    _use(flaky, monkeypatch)
    sharding.connect(Settings(ray_address="ray://127.0.0.1:10001"))
    assert flaky.calls == 3
    assert flaky.waits == [1.0, 2.0]


def test_an_unreachable_cluster_is_unavailable_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flaky = _FlakyRay(failures=1000)
    _use(flaky, monkeypatch)
    monkeypatch.setattr(sharding, "CONNECT_TIMEOUT_S", 0.0)
    with pytest.raises(Unavailable) as refused:
        sharding.connect(Settings(ray_address="ray://127.0.0.1:10001"))
    assert refused.value.field == "RAY_ADDRESS"
    assert flaky.calls == 1


def test_a_local_ray_that_fails_to_start_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    # On busy cores a local GCS can miss Ray's own start-up wait: start it again.
    flaky = _FlakyRay(failures=1)
    _use(flaky, monkeypatch)
    sharding.connect(Settings())
    assert flaky.calls == 2 and flaky.waits == [1.0]


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


def _request(
    planted: PlantedLayer, methods: list[str], block: int, job: str = "job", **fields: int
) -> explainer_pb2.ExplainRequest:
    spec = common_pb2.DissectionSpec(compute=common_pb2.ComputeSpec(unit_block_size=block))
    for method in methods:
        getattr(spec, method).SetInParent()
    spec.netdissect.top_quantile = TOP_QUANTILE
    return explainer_pb2.ExplainRequest(
        job_id=job,
        layer=planted.layer,
        methods=methods,
        spec=spec,
        dataset_key=planted.dataset_key,
        acts_key=planted.acts_key,
        clip_dissect=planted.clip,
        **fields,
    )


def _run(
    store: LocalStore, request: explainer_pb2.ExplainRequest
) -> list[explainer_pb2.ExplainProgress]:
    plan = plan_request(store, request, EXPLAINER_METHODS)
    return list(explain(Settings(store_url=store.url), store, plan))


def _rows(store: LocalStore, job: str, layer: str, method: str) -> dict[int, dict]:
    return result_store.read_rows(store, job, layer, method)


def _close(a: object, b: object, rel: float) -> bool:
    """Equal structure and strings, floats within `rel` (batched BLAS may reorder sums)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=rel)
    return a == b


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_result_blocks_are_validated_before_they_are_written(store: LocalStore) -> None:
    good = result_store.message_row(0, common_pb2.CompositionalResult(formula="a", length=1))
    with pytest.raises(ValueError, match="holds units"):
        result_store.write_block(store, "j", "conv", "compositional", 0, 2, [good])
    with pytest.raises(ValueError, match="not valid"):
        result_store.write_block(store, "j", "conv", "compositional", 0, 1, [{**good, "iou": "x"}])
    with pytest.raises(ValueError, match="not valid"):
        result_store.write_block(store, "j", "conv", "simulation", 0, 1, [{"unit": 0, "x": 1}])
    assert not store.list("results/")
    result_store.write_block(store, "j", "conv", "compositional", 0, 1, [good])
    assert store.get_json(keys.result_block("j", "conv", "compositional", 0, 1)) == {
        "units": [{"unit": 0, "formula": "a", "length": 1}]
    }


# -- Ray plumbing ---------------------------------------------------------------------------


@ray.remote(max_retries=2, retry_exceptions=[StoreError])
def _flaky_block(u0: int, u1: int) -> BlockOutcome:
    if attempt_number() == 0:
        raise StoreError("the store hiccuped")
    return BlockOutcome(u0, u1, attempt_number(), computed=True)


@ray.remote
def _slow_block(u0: int, u1: int) -> BlockOutcome:
    time.sleep(60)
    return BlockOutcome(u0, u1, 0, computed=True)


def test_transient_errors_are_retried_and_counted(local_ray: None) -> None:
    before = _counter("neurodissect_ray_task_retries_total")
    outcomes = list(gather([_flaky_block.remote(0, 4), _flaky_block.remote(4, 8)], lambda: True))
    assert sorted((o.u0, o.attempt) for o in outcomes) == [(0, 1), (4, 1)]
    assert _counter("neurodissect_ray_task_retries_total") - before == 2


def test_cancelled_caller_cancels_outstanding_tasks(local_ray: None) -> None:
    refs = [_slow_block.remote(0, 1), _slow_block.remote(1, 2)]
    started = time.monotonic()
    deadline = started + 1.0
    with pytest.raises(Cancelled):
        list(gather(refs, lambda: time.monotonic() < deadline))
    assert time.monotonic() - started < 10
    for ref in refs:
        with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError)):
            ray.get(ref, timeout=30)


def test_a_failed_block_raises_its_own_error_and_is_counted(
    local_ray: None, store: LocalStore, planted: PlantedLayer
) -> None:
    store.delete(keys.acts_chunk(planted.acts_key, planted.layer, 8, 16, 40, 80))
    failures = _counter("neurodissect_ray_task_failures_total")
    with pytest.raises(NotFound, match="acts/"):
        _run(store, _request(planted, ["netdissect"], 8))
    assert _counter("neurodissect_ray_task_failures_total") - failures == 1
    assert not result_store.block_stored(store, "job", planted.layer, "netdissect", 8, 16)


# -- explaining through Ray -----------------------------------------------------------------


def test_results_identical_for_unit_blocks_of_1_7_and_64(
    local_ray: None, store: LocalStore, planted: PlantedLayer
) -> None:
    results = {}
    for block in (1, 7, 64):
        job = f"b{block}"
        progress = _run(store, _request(planted, ALL_METHODS, block, job=job))
        assert progress[-1].finished and progress[-1].units_done == planted.n_units
        results[block] = {m: _rows(store, job, planted.layer, m) for m in ALL_METHODS}
        stored = store.list(keys.results_prefix(job, planted.layer, "netdissect"))
        assert sum(name.endswith(".json") and "/u" in name for name in stored) == len(
            unit_blocks(0, planted.n_units, block)
        )
    for method in ALL_METHODS:
        assert sorted(results[1][method]) == list(range(planted.n_units)), method
        if method in ("linear", "simulation"):
            # LE fits a block's units in one batch: BLAS may sum in another order (~1e-16).
            assert _close(results[1][method], results[7][method], 1e-9), method
            assert _close(results[1][method], results[64][method], 1e-9), method
        else:
            assert results[1][method] == results[7][method] == results[64][method], method
    labels = [results[7]["clip_dissect"][u]["label"] for u in range(planted.n_units)]
    assert labels == list(planted.planted)
    # Network Dissection's small masks suit the object units (scene labels cover images).
    objects = [u for u in range(planted.n_units) if planted.planted[u] in OBJECTS]
    assert [results[7]["netdissect"][u]["label"] for u in objects] == [
        planted.planted[u] for u in objects
    ]


def test_clip_dissect_labels_do_not_depend_on_the_requested_range(
    local_ray: None, store: LocalStore, planted: PlantedLayer
) -> None:
    _run(store, _request(planted, ["clip_dissect"], 64, job="whole"))
    _run(store, _request(planted, ["clip_dissect"], 4, job="parts", unit_start=0, unit_end=9))
    _run(store, _request(planted, ["clip_dissect"], 4, job="parts", unit_start=9))
    assert _rows(store, "parts", planted.layer, "clip_dissect") == _rows(
        store, "whole", planted.layer, "clip_dissect"
    )


MARKERS = {
    "netdissect": lambda u: result_store.message_row(
        u, common_pb2.NetDissectResult(label="MARKER", category="object")
    ),
    "compositional": lambda u: result_store.message_row(
        u, common_pb2.CompositionalResult(formula="MARKER", length=1)
    ),
    "clip_dissect": lambda u: result_store.message_row(
        u, common_pb2.ClipDissectResult(label="MARKER", score=-1.0)
    ),
    "linear": lambda u: result_store.message_row(u, common_pb2.LinearResult(explanation="MARKER")),
    "simulation": lambda u: result_store.simulation_row(u, {"MARKER": 0.5}, dead=False),
}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_restart_skips_blocks_already_stored(
    local_ray: None, store: LocalStore, planted: PlantedLayer, method: str
) -> None:
    rows = [MARKERS[method](u) for u in range(7, 14)]
    result_store.write_block(store, "job", planted.layer, method, 7, 14, rows)
    explained = _counter("neurodissect_units_explained_total", method=method)
    progress = _run(store, _request(planted, [method], 7))
    assert progress[-1].finished
    assert [(p.units_done, p.units_total) for p in progress if p.method][-1] == (20, 20)
    stored = _rows(store, "job", planted.layer, method)
    assert [stored[u] for u in range(7, 14)] == rows
    assert sorted(stored) == list(range(planted.n_units))
    assert "MARKER" not in str(stored[0])
    assert _counter("neurodissect_units_explained_total", method=method) - explained == 13
    again = _run(store, _request(planted, [method], 7))
    assert [p.message for p in again[:-1]] == ["already stored", "layer summary and exports"]
    assert _rows(store, "job", planted.layer, method) == stored


def test_compositional_reuses_the_jobs_netdissect_thresholds(
    local_ray: None, store: LocalStore, planted: PlantedLayer
) -> None:
    never = common_pb2.NetDissectResult(label="car", category="object", threshold=1e9)
    rows = [result_store.message_row(u, never) for u in range(0, 7)]
    result_store.write_block(store, "job", planted.layer, "netdissect", 0, 7, rows)
    _run(store, _request(planted, ["compositional"], 7))
    stored = _rows(store, "job", planted.layer, "compositional")
    # A threshold no activation reaches leaves an empty mask: no formula.
    assert [stored[u].get("formula", "") for u in range(7)] == [""] * 7
    assert [stored[u]["formula"] for u in (9, 10)] == list(planted.planted[9:11])
    request = _request(planted, ["compositional"], 7, job="other")
    request.spec.compositional.top_quantile = TOP_QUANTILE / 2
    result_store.write_block(store, "other", planted.layer, "netdissect", 0, 7, rows)
    _run(store, request)
    assert _rows(store, "other", planted.layer, "compositional")[0]["formula"]


def test_simulation_scores_every_method_and_counts_dead_units_apart(
    local_ray: None, store: LocalStore, planted: PlantedLayer
) -> None:
    pooled = store.get_arrays(keys.pooled(planted.acts_key, planted.layer))
    pooled["mean"][:, 3] = 0.5  # a dead unit: constant everywhere
    store.put_arrays(keys.pooled(planted.acts_key, planted.layer), pooled)
    _run(store, _request(planted, ["clip_dissect", "linear", "simulation"], 7))
    rows = _rows(store, "job", planted.layer, "simulation")
    assert rows[3]["dead"] and set(rows[3]["simulation"]) == {"clip_dissect", "linear"}
    assert all(v == "NaN" for v in rows[3]["simulation"].values())
    assert not rows[0]["dead"] and rows[0]["simulation"]["clip_dissect"] > 0.9
    summary = store.get_json(keys.result_summary("job", planted.layer, "simulation"))
    assert summary["dead_units"] == 1 and summary["units"] == planted.n_units
    assert summary["simulator"] == "labels"
    assert summary["scored_units"]["clip_dissect"] == planted.n_units - 1
    assert summary["simulation_mean"]["clip_dissect"] > 0.9
    assert summary["simulation_sem"]["clip_dissect"] > 0


def test_clip_concepts_for_linear_explanations_and_the_simulator(
    local_ray: None, store: LocalStore, planted: PlantedLayer
) -> None:
    request = _request(planted, ["linear", "simulation"], 7)
    request.spec.linear.concepts = "clip"
    request.linear.CopyFrom(planted.clip)
    request.simulation.CopyFrom(planted.clip)
    _run(store, request)
    rows = _rows(store, "job", planted.layer, "linear")
    assert {row["concepts"] for row in rows.values()} == {"clip"}
    assert [rows[u]["terms"][0]["concept"] for u in range(planted.n_units)] == list(
        planted.planted
    )
    summary = store.get_json(keys.result_summary("job", planted.layer, "simulation"))
    assert summary["simulator"].startswith("clip sigmoid")
    assert summary["simulation_mean"]["linear"] > 0.8
    split = store.get_json(keys.split(planted.dataset_key))
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (84, 12, 24)


# -- bad requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        ({"methods": ["netdissect", "gradcam"]}, InvalidArgument, "methods[1]"),
        ({"methods": []}, InvalidArgument, "methods"),
        ({"unit_start": 20}, InvalidArgument, "unit_start"),
        ({"unit_start": 5, "unit_end": 21}, InvalidArgument, "unit_end"),
        ({"unit_start": 5, "unit_end": 5}, InvalidArgument, "unit_end"),
        ({"acts_key": "nothing-here"}, NotFound, "acts_key"),
        ({"layer": "../etc"}, InvalidArgument, "layer"),
        ({"job_id": ""}, InvalidArgument, "job_id"),
    ],
)
def test_bad_requests_name_the_field(
    store: LocalStore, planted: PlantedLayer, change: dict, error: type, field: str
) -> None:
    request = _request(planted, ["netdissect"], 7)
    for name, value in change.items():
        if isinstance(value, list):
            del getattr(request, name)[:]
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    with pytest.raises(error) as caught:
        plan_request(store, request, EXPLAINER_METHODS)
    assert caught.value.field == field


def test_missing_inputs_name_the_field(store: LocalStore, planted: PlantedLayer) -> None:
    request = _request(planted, ["clip_dissect"], 7)
    request.clip_dissect.text_key = "embed/text/none/none.npz"
    with pytest.raises(NotFound) as caught:
        plan_request(store, request, EXPLAINER_METHODS)
    assert caught.value.field == "clip_dissect.text_key"
    request = _request(planted, ["clip_dissect"], 7)
    request.ClearField("clip_dissect")
    with pytest.raises(InvalidArgument) as caught:
        plan_request(store, request, EXPLAINER_METHODS)
    assert caught.value.field == "clip_dissect.image_key"
    store.delete(keys.concepts(planted.dataset_key))
    with pytest.raises(NotFound) as caught:
        plan_request(store, _request(planted, ["netdissect"], 7), EXPLAINER_METHODS)
    assert caught.value.field == "dataset_key"
