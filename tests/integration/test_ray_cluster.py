"""The explainer on a real multi-process Ray cluster started by the test.

`ray start --head` plus a second node (`ray start --address=...`), one CPU each, with
their own temp dir and free ports. A worker process executing a block task is killed
with SIGKILL mid-job; Ray retries the task and the job ends with results identical
to an undisturbed run.

The cluster is stopped by killing exactly its processes — the process groups of the
two `ray start` calls (each runs in its own session) and their descendants (Ray
workers get process groups of their own) — not with `ray stop --force`, which kills
every Ray process of the machine, other tests' and other users' included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from neurodissect.v1 import common_pb2, explainer_pb2
from prometheus_client import REGISTRY

from services.common.settings import Settings
from services.common.store import LocalStore
from services.explainer import results_io, sharding
from services.explainer.explain_plan import plan_request
from services.explainer.servicer import explain
from tests.fixtures.planted_layer import PlantedLayer, write_planted
from tests.fixtures.ports import free_port

RAY = str(Path(sys.executable).with_name("ray"))
KILLED_TASK = "ray::netdissect_block"


@dataclass
class Cluster:
    address: str
    groups: list[int]  # process group ids of the two `ray start` sessions


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
    command = [
        RAY, "start", "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", *args, *_node_ports(),
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


def _kill_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


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
        _kill_group(group)
    deadline = time.monotonic() + 30
    while (left := _cluster_processes(groups)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    ray.shutdown()  # a Ray left connected by another module would be reused
    temp_dir = tempfile.mkdtemp(prefix="ndx-ray-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Token auth would read a token shared by every Ray of the machine; this cluster is private.
    env["RAY_AUTH_MODE"] = "disabled"
    groups: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        patch.delenv("RAY_ADDRESS", raising=False)
        try:
            port = free_port()
            groups.append(_ray_start(
                ["--head", f"--port={port}", "--include-dashboard=false",
                 "--ray-client-server-port", str(free_port()),
                 "--dashboard-port", str(free_port())],
                env, temp_dir,
            ))
            address = f"127.0.0.1:{port}"
            groups.append(_ray_start([f"--address={address}"], env, temp_dir))
            sharding.connect(Settings(ray_address=address))
            deadline = time.monotonic() + 60
            while len([n for n in ray.nodes() if n["Alive"]]) < 2:
                assert time.monotonic() < deadline, ray.nodes()
                time.sleep(0.5)
            yield Cluster(address, groups)
        finally:
            ray.shutdown()
            _stop(groups)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _explain(store: LocalStore, planted: PlantedLayer, job: str) -> dict[str, dict[int, dict]]:
    methods = ["netdissect", "clip_dissect"]
    spec = common_pb2.DissectionSpec(compute=common_pb2.ComputeSpec(unit_block_size=2))
    for method in methods:
        getattr(spec, method).SetInParent()
    request = explainer_pb2.ExplainRequest(
        job_id=job, layer=planted.layer, methods=methods, spec=spec,
        dataset_key=planted.dataset_key, acts_key=planted.acts_key, clip_dissect=planted.clip,
    )
    progress = list(explain(Settings(store_url=store.url), store, plan_request(store, request)))
    assert progress[-1].finished
    return {m: results_io.read_rows(store, job, planted.layer, m) for m in methods}


def _task_workers(name: str, groups: list[int]) -> list[int]:
    """PIDs of the cluster's worker processes now executing a task called `name`.

    Ray titles a worker `ray::<task>` while it runs a task (`ray::IDLE` otherwise).
    """
    return [pid for pid, title in _cluster_processes(groups).items() if title.startswith(name)]


def test_the_cluster_has_two_nodes_of_one_cpu(cluster: Cluster) -> None:
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    assert ray.cluster_resources().get("CPU") == 2


def test_killed_worker_is_retried_and_results_are_identical(
    cluster: Cluster, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    planted = write_planted(store, n_images=1200, n_units=8, image_chunk=100)
    calm = _explain(store, planted, "calm")
    retries = REGISTRY.get_sample_value("neurodissect_ray_task_retries_total") or 0.0

    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["rows"] = _explain(store, planted, "killed")
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
    assert (REGISTRY.get_sample_value("neurodissect_ray_task_retries_total") or 0.0) > retries
