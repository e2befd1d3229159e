"""The explainer as a real process (`neurodissect serve explainer`, local Ray with 2 CPUs),
called over gRPC on a free loopback port with a planted layer in a local store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from neurodissect.v1 import common_pb2, explainer_pb2, explainer_pb2_grpc

from services.common import keys, result_store
from services.common.client import wait_healthy
from services.common.settings import Settings
from services.common.store import LocalStore
from tests.fixtures.planted_layer import OBJECTS, TOP_QUANTILE, PlantedLayer, write_planted
from tests.fixtures.ports import free_port
from tests.fixtures.processes import stop

METHODS = ["netdissect", "compositional", "clip_dissect", "linear", "simulation"]


@dataclass
class Explainer:
    stub: explainer_pb2_grpc.ExplainerStub
    store: LocalStore
    planted: PlantedLayer
    big: PlantedLayer  # slow enough per block to cancel a call midway
    log: Path


@pytest.fixture(scope="module")
def explainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Explainer]:
    root = tmp_path_factory.mktemp("explainer")
    store = LocalStore(root / "store")
    planted = write_planted(store)
    big = write_planted(
        store, n_images=1600, n_units=24, image_chunk=100, dataset_key="big", acts_key="big"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        NEURODISSECT_PORT=str(port),
        NEURODISSECT_HOST="127.0.0.1",
        NEURODISSECT_STORE_URL=store.url,
        NEURODISSECT_METRICS_PORT="0",
        NEURODISSECT_RAY_NUM_CPUS="2",
        NEURODISSECT_LOG_LEVEL="INFO",
    )
    log = root / "explainer.log"
    command = Path(sys.executable).with_name("neurodissect")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(command), "serve", "explainer"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    address = f"127.0.0.1:{port}"
    try:
        wait_healthy(address, Settings(), timeout=180)  # Ray starts first: slow on 2 busy cores
        with grpc.insecure_channel(address) as channel:
            stub = explainer_pb2_grpc.ExplainerStub(channel)
            yield Explainer(stub, store, planted, big, log)
    finally:
        stop(process)
    assert process.returncode == 0, log.read_text()[-3000:]


def _request(
    planted: PlantedLayer, methods: list[str], job: str, block: int = 8
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
    )


def test_explain_streams_progress_and_stores_every_block(explainer: Explainer) -> None:
    planted, store = explainer.planted, explainer.store
    progress = list(explainer.stub.Explain(_request(planted, METHODS, "grpc"), timeout=300))
    assert progress[-1].finished
    assert not any(p.finished for p in progress[:-1])
    for method in METHODS:
        last = [p for p in progress if p.method == method][-1]
        assert (last.units_done, last.units_total) == (planted.n_units, planted.n_units), method
        rows = result_store.read_rows(store, "grpc", planted.layer, method)
        assert sorted(rows) == list(range(planted.n_units)), method
    netdissect = result_store.read_rows(store, "grpc", planted.layer, "netdissect")
    objects = [u for u in range(planted.n_units) if planted.planted[u] in OBJECTS]
    assert [netdissect[u]["label"] for u in objects] == [planted.planted[u] for u in objects]
    clip = result_store.read_rows(store, "grpc", planted.layer, "clip_dissect")
    assert [clip[u]["label"] for u in range(planted.n_units)] == list(planted.planted)
    assert store.exists(keys.result_summary("grpc", planted.layer, "netdissect"))
    assert store.exists(keys.result_summary("grpc", planted.layer, "simulation"))
    tally = store.get(result_store.export_key("grpc", planted.layer, "tally"))
    assert tally.decode().splitlines()[0].startswith("unit,category,label,score")


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"methods": ["gradcam"]}, grpc.StatusCode.INVALID_ARGUMENT, "methods[0]"),
        ({"unit_end": 999}, grpc.StatusCode.INVALID_ARGUMENT, "unit_end"),
        ({"acts_key": "missing"}, grpc.StatusCode.NOT_FOUND, "acts_key"),
    ],
)
def test_bad_requests_get_precise_status_codes(
    explainer: Explainer, change: dict, code: grpc.StatusCode, field: str
) -> None:
    request = _request(explainer.planted, ["netdissect"], "bad")
    for name, value in change.items():
        if isinstance(value, list):
            del getattr(request, name)[:]
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    with pytest.raises(grpc.RpcError) as caught:
        list(explainer.stub.Explain(request, timeout=60))
    assert caught.value.code() == code
    assert field in caught.value.details()


def test_cancelled_call_stops_its_ray_tasks_and_the_server_keeps_serving(
    explainer: Explainer,
) -> None:
    big, store = explainer.big, explainer.store
    call = explainer.stub.Explain(_request(big, ["netdissect"], "cancelled", block=1), timeout=300)
    steps = [next(call)]  # the stage names its preparation steps, then finishes blocks
    while not steps[-1].units_done:
        steps.append(next(call))
    assert steps[0].message == "reading the concept table"
    assert steps[-1].method == "netdissect" and 0 < steps[-1].units_done < big.n_units
    call.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 10
    while b"cancelled by the client" not in explainer.log.read_bytes():
        assert time.monotonic() < deadline, explainer.log.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(2)  # a task still running now would store its block meanwhile
    stored = result_store.read_rows(store, "cancelled", big.layer, "netdissect")
    assert len(stored) < big.n_units
    progress = list(
        explainer.stub.Explain(_request(explainer.planted, ["netdissect"], "after"), timeout=300)
    )
    assert progress[-1].finished
