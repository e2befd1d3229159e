"""The explainer on a real multi-process Ray cluster started by the test.

`ray start --head` plus a second node (`ray start --address=...`), one CPU each, with
their own temp dir and free ports; the explainer runs as a real process
(`neurodissect serve explainer`) whose RAY_ADDRESS points at the head, and is called
over gRPC. A worker process executing a block task is killed with SIGKILL mid-job;
Ray retries the task, the job completes with results identical to an undisturbed
run, and the explainer's metrics count the retry.

Every Ray process here belongs to this test, and the test process itself never
joins a Ray: the explainer is the driver. The cluster is stopped by killing exactly
its processes — the process groups of the two `ray start` calls (each runs in its
own session) and their descendants (Ray workers get process groups of their own) —
not with `ray stop --force`, which kills every Ray process of the machine, other
tests' and other users' included.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from neurodissect.v1 import common_pb2, explainer_pb2, explainer_pb2_grpc

from services.common.client import wait_healthy
from services.common.settings import Settings
from services.common.store import LocalStore
from services.explainer import results_io
from tests.fixtures.planted_layer import PlantedLayer, write_planted
from tests.fixtures.ports import free_port

BIN = Path(sys.executable).parent
KILLED_TASK = "ray::netdissect_block"
METHODS = ["netdissect", "clip_dissect", "linear"]


@dataclass
class Cluster:
    address: str
    groups: list[int]  # process group ids of the two `ray start` sessions
    env: dict[str, str]  # the environment every process of the cluster runs with


@dataclass
class Explainer:
    stub: explainer_pb2_grpc.ExplainerStub
    metrics_port: int
    store: LocalStore
    planted: PlantedLayer
    log: Path


def _node_ports() -> list[str]:
    """Free ports for every server of one Ray node, so nothing collides with other Rays."""
    flags = [
        "--node-manager-port",
        "--object-manager-port",
        "--metrics-export-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
    ]
    return [item for flag in flags for item in (flag, str(free_port()))]


def _ray_start(args: list[str], env: dict[str, str], temp_dir: str) -> int:
    """Run `ray start` in a session of its own; return its process group id."""
    command = [
        str(BIN / "ray"), "start", "--num-cpus=1", f"--temp-dir={temp_dir}",
        "--disable-usage-stats", "--node-ip-address=127.0.0.1", *args, *_node_ports(),
    ]
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    output = process.communicate(timeout=180)[0]
    if process.returncode != 0:
        _stop([process.pid])
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return process.pid


def _cluster_processes(groups: list[int]) -> dict[int, str]:
    """PID -> process title of every process of the cluster: the groups and their descendants."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), title)  # ppid, pgid
    members = {pid for pid, (_, pgid, _) in table.items() if pgid in groups}
    while True:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in members} - members
        if not children:
            return {pid: table[pid][2] for pid in members}
        members |= children


def _stop(groups: list[int]) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (left := _cluster_processes(groups)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    temp_dir = tempfile.mkdtemp(prefix="ndx-ray-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A private cluster: no token shared with the machine's other Rays.
    env["RAY_AUTH_MODE"] = "disabled"
    groups: list[int] = []
    try:
        port = free_port()
        groups.append(_ray_start(
            ["--head", f"--port={port}", "--include-dashboard=false",
             "--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port())],
            env, temp_dir,
        ))
        address = f"127.0.0.1:{port}"
        groups.append(_ray_start([f"--address={address}"], env, temp_dir))
        yield Cluster(address, groups, env)
    finally:
        _stop(groups)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
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
    return {m: results_io.read_rows(explainer.store, job, planted.layer, m) for m in METHODS}


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
    return [pid for pid, title in _cluster_processes(groups).items() if title.startswith(name)]


def test_cluster_has_two_nodes_and_the_explainer_drives_it(
    cluster: Cluster, explainer: Explainer
) -> None:
    raylets = [t for t in _cluster_processes(cluster.groups).values() if "raylet" in t]
    assert len(raylets) == 2
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
