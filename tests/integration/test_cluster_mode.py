"""Cluster mode on one machine gives the toy job exactly the per-unit results of local mode.

Cluster mode is what the Helm chart deploys, on loopback: SeaweedFS as the S3 store
(tests/fixtures/seaweedfs.py), a multi-process Ray cluster (a head and a worker node,
tests/fixtures/ray_cluster.py) that the explainer joins as a Ray client, and the four
services as separate processes (`python -m services.cli.main serve NAME`), each
configured only through the environment the chart renders for its Deployment (the
extractor's StatefulSet) (ConfigMap, per-service variables and Secrets, as test_chart
reads them). The one stand-in is cluster DNS: the Service names in the peer addresses
become 127.0.0.1.

Local mode is the session's stack (a local directory store, Ray inside the explainer)
and its reference job. Both run the same toy spec; ListUnits must give equal results
for every layer, unit and method, floats compared exactly: every unit block is
computed by the same code from the same bytes, whichever Ray worker runs it, and no
reduction spans blocks.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from neurodissect.v1 import common_pb2

from services.cli.stack import LocalStack
from services.common import keys
from services.common.client import wait_healthy
from services.common.settings import SERVICES, Settings
from services.gateway import results
from services.gateway.client import NeurodissectClient
from services.gateway.validation import requested_methods
from tests.fixtures.ports import free_port
from tests.fixtures.ray_cluster import Cluster, ray_cluster
from tests.fixtures.seaweedfs import S3Server, seaweedfs
from tests.integration.test_chart import FULLNAME, container_env, render_values, workload

# Jobs of the toy world end to end on real processes (the toy models ship: nothing trains).
pytestmark = pytest.mark.timeout(1800)

REPO = Path(__file__).resolve().parents[2]
SERVICE_START_TIMEOUT_S = 300.0
STOP_GRACE_S = 30.0
UNIT_FIELDS = ("netdissect", "compositional", "clip_dissect", "linear", "milan")


def chart_environments(
    s3: S3Server, ray_address: str, ports: dict[str, int], metrics_ports: dict[str, int]
) -> dict[str, dict[str, str]]:
    """Each service's environment as the chart renders it for this S3 store and Ray cluster."""
    values = {
        "minio": {"enabled": False},
        "store": {"endpoint": s3.endpoint, "secure": False,
                  "accessKey": s3.access_key, "secretKey": s3.secret_key},
        "ray": {"address": ray_address},
        # Shared with the local stack, so the toy models are not trained again.
        "scratch": {"cacheDir": str(REPO / "var" / "cache")},
        **{name: {"port": ports[name], "metricsPort": metrics_ports[name]} for name in SERVICES},
    }
    _, objects = render_values(values)
    environments = {}
    for name in SERVICES:
        deployment = workload(objects, name)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["serve", name]
        env = container_env(objects, container)
        for peer in SERVICES:
            variable = f"NEURODISSECT_{peer.upper()}_ADDR"
            host, port = env[variable].rsplit(":", 1)
            assert host == f"{FULLNAME}-{peer}", env[variable]
            env[variable] = f"127.0.0.1:{port}"  # what cluster DNS resolves the Service to
        environments[name] = env
    return environments


@dataclass
class ClusterMode:
    environments: dict[str, dict[str, str]]  # each service's chart-rendered environment
    ray: Cluster
    logs: Path
    s3: S3Server

    @property
    def client_settings(self) -> Settings:
        """Where a client on this machine reaches the gateway."""
        return Settings(gateway_addr=self.environments["gateway"]["NEURODISSECT_GATEWAY_ADDR"],
                        rpc_timeout_s=60.0)

    def store_settings(self) -> Settings:
        """The settings the services load: the S3 store among them."""
        return Settings.load(self.environments["gateway"])


def _start_service(name: str, env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    # Nothing of this process's own configuration leaks in: the chart's variables only.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("NEURODISSECT_", "RAY_"))}
    with (logs / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "serve", name],
            env={**inherited, **env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_serving(name: str, process: subprocess.Popen[bytes], address: str, logs: Path) -> None:
    deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            log = (logs / f"{name}.log").read_text(errors="replace")
            pytest.fail(f"{name} exited with {process.returncode}:\n{log[-3000:]}")
        try:
            wait_healthy(address, Settings(), timeout=2.0)
            return
        except TimeoutError:
            assert time.monotonic() < deadline, f"{name} not healthy after the deadline"


def _stop(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM (gateway first: it stops calling the others), SIGKILL after the grace period."""
    for name in sorted(processes, key=lambda n: n != "gateway"):
        processes[name].send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes.values():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def cluster_mode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterMode]:
    """SeaweedFS, a two-node Ray cluster and the four services configured by the chart."""
    root = tmp_path_factory.mktemp("cluster-mode")
    logs = root / "logs"
    logs.mkdir()
    with seaweedfs(root / "seaweedfs") as s3, ray_cluster() as ray:
        ports = {name: free_port() for name in SERVICES}
        metrics_ports = {name: free_port() for name in SERVICES}
        environments = chart_environments(s3, ray.client_address, ports, metrics_ports)
        processes: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name in SERVICES:
                processes[name] = _start_service(name, environments[name], logs)
            for name in SERVICES:
                _wait_serving(name, processes[name], f"127.0.0.1:{ports[name]}", logs)
            yield ClusterMode(environments, ray, logs, s3)
        finally:
            _stop(processes)


def _units(
    settings: Settings, job: common_pb2.Job
) -> dict[str, list[common_pb2.UnitResult]]:
    with NeurodissectClient(settings) as client:
        return {layer: list(client.units(job.id, layer)) for layer in job.spec.layers}


def _assert_same_figures(
    got: Iterable[common_pb2.LayerSummary], want: Iterable[common_pb2.LayerSummary]
) -> None:
    """Equal layer summaries, floats within 1e-9 relative, occlusion's seconds left out.

    Seconds are a timing, not a figure. The figures are means over a layer's rows (the
    rows themselves are compared exactly): summed in another order they can move in
    their last bits.
    """

    def figures(summaries: Iterable[common_pb2.LayerSummary]) -> list[dict[str, Any]]:
        out = []
        for summary in summaries:
            as_dict = json_format.MessageToDict(summary, preserving_proto_field_name=True)
            as_dict.get("occlusion", {}).pop("seconds", None)
            out.append(as_dict)
        return out

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return bool(a == b)

    mine, theirs = figures(got), figures(want)
    assert same(mine, theirs), (mine, theirs)


def test_the_toy_job_in_cluster_mode_matches_local_mode(
    cluster_mode: ClusterMode,
    platform: LocalStack,
    toy_spec: common_pb2.DissectionSpec,
    reference_job: common_pb2.Job,
) -> None:
    assert reference_job.state == common_pb2.SUCCEEDED, reference_job.error
    with NeurodissectClient(cluster_mode.client_settings) as client:
        job = client.wait(client.submit(toy_spec).id)
    assert job.state == common_pb2.SUCCEEDED, job.error

    # It really ran in cluster mode: the explainer drove the Ray cluster as a client, and
    # the job and every method's results are objects in the S3 bucket.
    explainer_log = (cluster_mode.logs / "explainer.log").read_text()
    assert f"Ray connected: {cluster_mode.ray.client_address}" in explainer_log
    settings = cluster_mode.store_settings()
    assert settings.store_url.startswith("s3://")
    store = settings.open_store()
    assert store.exists(keys.job(job.id))
    stored = {tuple(key.split("/")[2:4]) for key in store.list(f"results/{job.id}/")}
    methods = [m for m in requested_methods(toy_spec) if m != "milan"]
    assert stored >= {(layer, m) for layer in toy_spec.layers for m in methods}

    local = _units(platform.settings, reference_job)
    cluster = _units(cluster_mode.client_settings, job)
    for layer, units in local.items():
        assert units, layer
        for unit in units:
            assert all(unit.HasField(f) for f in UNIT_FIELDS), unit
            assert set(unit.simulation) >= {"netdissect", "milan"}, unit.simulation
        # Readable differences first, then the exact comparison of the messages.
        assert [results.unit_dict(u) for u in cluster[layer]] == [
            results.unit_dict(u) for u in units
        ], layer
        assert cluster[layer] == units, layer
    _assert_same_figures(job.summary, reference_job.summary)


OUTAGE_S = 30.0


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "services.cli.main", "--gateway-addr",
               settings.gateway_addr, "--timeout", "10", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_a_store_outage_mid_job_pauses_it_and_it_ends_identical(
    cluster_mode: ClusterMode,
    platform: LocalStack,
    toy_spec: common_pb2.DissectionSpec,
    reference_job: common_pb2.Job,
) -> None:
    settings = cluster_mode.client_settings
    spec = common_pb2.DissectionSpec()
    spec.CopyFrom(toy_spec)
    spec.name = "through a store outage"
    with NeurodissectClient(settings) as client:
        job = client.submit(spec)
        deadline = time.monotonic() + 600
        while client.get(job.id).state in (common_pb2.QUEUED, common_pb2.EXTRACTING):
            assert time.monotonic() < deadline, "the job never left extraction"
            time.sleep(0.2)
        with cluster_mode.s3.outage():
            started = time.monotonic()
            time.sleep(5)  # the gateway's probe notices within seconds
            status = _cli(settings, "status", job.id, "--format", "json")
            assert status.returncode == 0, status.stderr
            messages = [stage.get("message", "") for stage in json.loads(status.stdout)["stages"]]
            assert any(m.startswith("waiting for the object store s3://") for m in messages), (
                messages
            )
            listed = _cli(settings, "jobs", "--format", "json")
            assert listed.returncode == 0 and job.id in listed.stdout, listed.stderr
            submitted = time.monotonic()
            refused = _cli(settings, "submit", "--model", "toynet", "--layers", "layer3",
                           "--dataset-kind", "toyworld", "--methods", "netdissect")
            assert refused.returncode == 3, refused.stdout + refused.stderr
            assert "UNAVAILABLE" in refused.stderr and "object store" in refused.stderr
            assert time.monotonic() - submitted < 20
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - started)))
        job = client.wait(job.id)
    assert job.state == common_pb2.SUCCEEDED, job.error
    local = _units(platform.settings, reference_job)
    after = _units(settings, job)
    for layer, units in local.items():
        assert after[layer] == units, layer
    _assert_same_figures(job.summary, reference_job.summary)
