"""The services' Prometheus metrics during a real toy job, scraped directly and by Prometheus.

A real Prometheus server (Debian's `prometheus`) scrapes the four services of the
session's local stack every second. One toy job runs through the Python client while
the test scrapes each service's /metrics itself: before the job, on every WatchJob
event, and after. Its spec is the session's toy spec with another image chunk size:
that changes the activations' content key, so the extractor really passes the images
through the model instead of finding them cached by an earlier job of the session.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from neurodissect.v1 import common_pb2
from prometheus_client.parser import text_string_to_metric_families

from services.cli.stack import LocalStack
from services.common.settings import SERVICES
from services.gateway.client import NeurodissectClient
from services.gateway.jobs import TERMINAL
from services.gateway.stages import PIPELINE
from services.gateway.validation import requested_methods
from tests.fixtures.ports import free_port
from tests.fixtures.processes import stop

# Jobs of the toy world end to end on real processes (the toy models ship: nothing trains).
pytestmark = pytest.mark.timeout(1800)

JOB_TIMEOUT_S = 600.0
PROMETHEUS_START_TIMEOUT_S = 60.0
PROMETHEUS_SCRAPED_TIMEOUT_S = 30.0
IMAGE_CHUNK = 64

# (metric sample name, labels) -> value
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample a service's /metrics serves now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, /, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_all(platform: LocalStack) -> dict[str, Samples]:
    return {name: scrape(platform.metrics_ports[name]) for name in SERVICES}


def job_progress(samples: Samples, job_id: str) -> dict[str, float]:
    """Stage -> `neurodissect_job_progress_ratio` of one job."""
    return {
        dict(labels)["stage"]: v
        for (name, labels), v in samples.items()
        if name == "neurodissect_job_progress_ratio" and dict(labels)["job_id"] == job_id
    }


# ----------------------------------------------------------------------------- Prometheus


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result vector of an instant query."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as response:
            active: list[dict[str, Any]] = json.load(response)["data"]["activeTargets"]
        return active


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        pytest.fail("the prometheus binary is missing: `make system-deps` installs Debian's "
                    "prometheus package", pytrace=False)
    return found


@pytest.fixture(scope="module")
def prometheus(platform: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    Prometheus
]:
    """A Prometheus server scraping the four services every second, all targets up."""
    binary = prometheus_binary()
    root = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {"job_name": name,
             "static_configs": [{"targets": [f"127.0.0.1:{platform.metrics_ports[name]}"]}]}
            for name in SERVICES
        ],
    }
    (root / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = root / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + PROMETHEUS_START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            try:
                targets = server.targets()
            except OSError:
                targets = []
            if len(targets) == len(SERVICES) and all(t["health"] == "up" for t in targets):
                break
            assert time.monotonic() < deadline, f"targets not up: {targets}"
            time.sleep(0.5)
        yield server
    finally:
        stop(process)


# ----------------------------------------------------------------------------- the job


@dataclass
class ObservedJob:
    job: common_pb2.Job
    units: dict[str, int]  # layer -> units
    before: dict[str, Samples]
    after: dict[str, Samples]
    # Each stage's `neurodissect_job_progress_ratio` values as scraped on WatchJob events.
    progress: dict[str, list[float]] = field(default_factory=dict)


def _bad_quantile(spec: common_pb2.DissectionSpec) -> None:
    spec.netdissect.top_quantile = 1.5


def _unknown_model(spec: common_pb2.DissectionSpec) -> None:
    spec.model.name = "nosuchnet"


# Spoiled specs submitted after the job, with the code the gateway refuses each with.
REFUSED: tuple[tuple[Callable[[common_pb2.DissectionSpec], None], grpc.StatusCode], ...] = (
    (_bad_quantile, grpc.StatusCode.INVALID_ARGUMENT),
    (_unknown_model, grpc.StatusCode.NOT_FOUND),
)


@pytest.fixture(scope="module")
def observed(
    platform: LocalStack, toy_spec: common_pb2.DissectionSpec, prometheus: Prometheus
) -> ObservedJob:
    """A toy job followed on WatchJob, the services scraped before, during and after it,
    then two refused submissions: a bad spec (INVALID_ARGUMENT) and an unknown model."""
    spec = common_pb2.DissectionSpec()
    spec.CopyFrom(toy_spec)
    spec.compute.image_chunk_size = IMAGE_CHUNK
    with NeurodissectClient(platform.settings) as client:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while any(j.state not in TERMINAL for j in client.jobs()):
            assert time.monotonic() < deadline, "earlier jobs still running"
            time.sleep(0.5)
        described = client.describe_model(spec.model)
        units = {layer.name: layer.shape[0] for layer in described.layers}
        before = scrape_all(platform)
        job = client.submit(spec)
        progress: dict[str, list[float]] = {}
        for seen in client.watch(job.id):
            for stage, ratio in job_progress(scrape(platform.metrics_ports["gateway"]),
                                             job.id).items():
                progress.setdefault(stage, []).append(ratio)
            job = seen
            if job.state in TERMINAL:
                break
        for spoil, code in REFUSED:
            bad = common_pb2.DissectionSpec()
            bad.CopyFrom(spec)
            spoil(bad)
            with pytest.raises(grpc.RpcError) as refused:
                client.submit(bad)
            assert refused.value.code() == code, refused.value.details()
    # The gateway drops a finished job's gauges right after storing its final state.
    deadline = time.monotonic() + 10
    while job_progress(scrape(platform.metrics_ports["gateway"]), job.id):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return ObservedJob(job, {layer: units[layer] for layer in spec.layers}, before,
                       scrape_all(platform), progress)



def delta(observed: ObservedJob, service: str, name: str, /, **labels: str) -> float:
    """How much a sample of `service` grew over the observed job."""
    return value(observed.after[service], name, **labels) - value(
        observed.before[service], name, **labels
    )


# ----------------------------------------------------------------------------- tests


def test_progress_gauges_and_stage_throughput_move_with_the_job(observed: ObservedJob) -> None:
    job = observed.job
    assert job.state == common_pb2.SUCCEEDED, job.error
    # Progress: every stage's gauge was seen, between 0 and 1, never going back, ending at 1.
    assert {"extract", "explain", "caption"} <= set(observed.progress)
    for stage, ratios in observed.progress.items():
        assert all(0.0 <= r <= 1.0 for r in ratios), (stage, ratios)
        assert ratios == sorted(ratios), (stage, ratios)
    for stage in ("extract", "explain", "caption"):
        assert observed.progress[stage][-1] == 1.0, (stage, observed.progress[stage])
    assert any(0.0 < r < 1.0 for r in observed.progress["explain"]), observed.progress["explain"]
    assert job_progress(observed.after["gateway"], job.id) == {}

    # Throughput of each stage: exactly the work this job asked for.
    total_units = sum(observed.units.values())
    assert delta(observed, "extractor", "neurodissect_images_extracted_total") == (
        job.spec.dataset.toyworld.n_images
    )
    explained = [m for m in requested_methods(job.spec) if m != "milan"]
    assert "simulation" in explained
    for method in explained:
        assert delta(observed, "explainer", "neurodissect_units_explained_total",
                     method=method) == total_units, method
    assert delta(observed, "captioner", "neurodissect_units_captioned_total") == total_units
    assert delta(observed, "gateway", "neurodissect_jobs", state="SUCCEEDED") == 1


def test_rpc_metrics_count_each_call_with_its_status_code(observed: ObservedJob) -> None:
    requests = "neurodissect_rpc_requests_total"

    def calls(service: str, method: str, code: str) -> float:
        return delta(observed, service, requests, service=service, method=method, code=code)

    assert calls("gateway", "SubmitDissection", "OK") == 1
    assert calls("gateway", "SubmitDissection", "INVALID_ARGUMENT") == 1
    assert calls("gateway", "SubmitDissection", "NOT_FOUND") == 1
    assert calls("gateway", "WatchJob", "OK") == 1
    assert calls("extractor", "Extract", "OK") == 1
    # Per layer: one Explain for the methods, then one for each step that runs after them
    # (occlusion's verification, simulation scoring, ablation scoring).
    spec = observed.job.spec
    later = sum(spec.HasField(m) for m in ("occlusion", "simulation", "ablation"))
    assert later >= 1
    assert calls("explainer", "Explain", "OK") == (1 + later) * len(observed.units)
    assert calls("captioner", "Caption", "OK") == len(observed.units)
    # The latency histogram counts every call, whatever its code.
    submitted = delta(observed, "gateway", "neurodissect_rpc_duration_seconds_count",
                      service="gateway", method="SubmitDissection")
    assert submitted == 3


def test_prometheus_scrapes_every_service_and_the_job_progress(
    observed: ObservedJob, prometheus: Prometheus
) -> None:
    up = {r["metric"]["job"]: r["value"][1] for r in prometheus.query("up")}
    assert up == dict.fromkeys(SERVICES, "1")

    # Prometheus catches up with the finished job: its state counted, its gauges gone.
    job_id = observed.job.id
    succeeded = value(observed.after["gateway"], "neurodissect_jobs", state="SUCCEEDED")
    deadline = time.monotonic() + PROMETHEUS_SCRAPED_TIMEOUT_S
    while True:
        counted = prometheus.query('neurodissect_jobs{job="gateway",state="SUCCEEDED"}')
        live = prometheus.query(f'neurodissect_job_progress_ratio{{job_id="{job_id}"}}')
        if counted and float(counted[0]["value"][1]) == succeeded and not live:
            break
        assert time.monotonic() < deadline, (counted, succeeded, live)
        time.sleep(0.5)

    # What Prometheus scraped while the job ran is kept.
    stored = prometheus.query(
        f'max_over_time(neurodissect_job_progress_ratio{{job_id="{job_id}"}}[1h])'
    )
    ratios = {r["metric"]["stage"]: float(r["value"][1]) for r in stored}
    assert set(ratios) <= {name for name, _ in PIPELINE}, ratios
    assert all(0.0 <= r <= 1.0 for r in ratios.values()), ratios
    # Explaining takes seconds: Prometheus, scraping every second, saw it under way.
    assert ratios.get("explain", 0.0) > 0.0, ratios
