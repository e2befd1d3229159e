"""The explainer on a real multi-process Ray cluster started by the test.

A head and a worker node (tests/fixtures/ray_cluster.py); the explainer runs as a
real process (`neurodissect serve explainer`) whose RAY_ADDRESS points at the head,
and is called over gRPC. A worker process executing a block task is killed with
SIGKILL mid-job; Ray retries the task, the job completes with results identical to
an undisturbed run, and the explainer's metrics count the retry.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from neurodissect.v1 import common_pb2, explainer_pb2, explainer_pb2_grpc

from services.common import result_store
from services.common.client import wait_healthy
from services.common.settings import Settings
from services.common.store import LocalStore
from tests.fixtures.planted_layer import PlantedLayer, write_planted
from tests.fixtures.ports import free_port
from tests.fixtures.processes import stop
from tests.fixtures.ray_cluster import BIN, Cluster, cluster_processes, ray_cluster

KILLED_TASK = "ray::method_block"  # the stage runner's one task, whatever the method
METHODS = ["netdissect", "clip_dissect", "linear"]


@dataclass
class Explainer:
    stub: explainer_pb2_grpc.ExplainerStub
    metrics_port: int
    store: LocalStore
    planted: PlantedLayer
    log: Path


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with ray_cluster() as started:
        yield started


@pytest.fixture(scope="module")
def explainer(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Explainer]:
    root = tmp_path_factory.mktemp("cluster")
    store = LocalStore(root / "store")
    planted = write_planted(store, n_images=1200, n_units=8, image_chunk=100)
    port, metrics_port = free_port(), free_port()
    env = dict(cluster.env)
    env.update(
        RAY_ADDRESS=cluster.address,
        NEURODISSECT_PORT=str(port),
        NEURODISSECT_HOST="127.0.0.1",
        NEURODISSECT_STORE_URL=store.url,
        NEURODISSECT_METRICS_PORT=str(metrics_port),
    )
    log = root / "explainer.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "neurodissect"), "serve", "explainer"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    try:
        wait_healthy(address, Settings(), timeout=180)
        with grpc.insecure_channel(address) as channel:
            stub = explainer_pb2_grpc.ExplainerStub(channel)
            yield Explainer(stub, metrics_port, store, planted, log)
    finally:
        stop(process)
    assert process.returncode == 0, log.read_text()[-3000:]


def _explain(explainer: Explainer, job: str) -> dict[str, dict[int, dict]]:
    planted = explainer.planted
    spec = common_pb2.DissectionSpec(compute=common_pb2.ComputeSpec(unit_block_size=2))
    for method in METHODS:
        getattr(spec, method).SetInParent()
    request = explainer_pb2.ExplainRequest(
        job_id=job, layer=planted.layer, methods=METHODS, spec=spec,
        dataset_key=planted.dataset_key, acts_key=planted.acts_key, clip_dissect=planted.clip,
    )
    progress = list(explainer.stub.Explain(request, timeout=300))
    assert progress[-1].finished
    return {m: result_store.read_rows(explainer.store, job, planted.layer, m) for m in METHODS}


def _retries(explainer: Explainer) -> float:
    """The explainer's `neurodissect_ray_task_retries_total`, scraped from its /metrics."""
    url = f"http://127.0.0.1:{explainer.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = re.search(r"^neurodissect_ray_task_retries_total ([0-9.e+]+)$", text, re.M)
    assert found, text
    return float(found.group(1))


def _task_workers(name: str, groups: list[int]) -> list[int]:
    """PIDs of the cluster's worker processes now executing a task called `name`.

    Ray titles a worker `ray::<task>` while it runs a task (`ray::IDLE` otherwise).
    """
    return [pid for pid, title in cluster_processes(groups).items() if title.startswith(name)]


def test_cluster_has_two_nodes_and_the_explainer_drives_it(
    cluster: Cluster, explainer: Explainer
) -> None:
    raylets = [t for t in cluster_processes(cluster.groups).values() if "raylet" in t]
    assert len(raylets) == 2
    # The explainer joins the cluster with its first job (it starts without Ray).
    assert "Ray connected" not in explainer.log.read_text()
    rows = _explain(explainer, "first")
    assert all(len(by_unit) == explainer.planted.n_units for by_unit in rows.values()), rows
    assert "Ray connected: 127.0.0.1:" in explainer.log.read_text()


def test_killed_worker_is_retried_and_results_are_identical(
    cluster: Cluster, explainer: Explainer
) -> None:
    calm = _explain(explainer, "calm")
    retries = _retries(explainer)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["rows"] = _explain(explainer, "killed")
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        workers = _task_workers(KILLED_TASK, cluster.groups)
        if workers:
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    thread.join(timeout=300)
    assert killed is not None, "no worker was caught executing a block task"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["rows"] == calm
    assert _retries(explainer) > retries
