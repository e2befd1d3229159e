"""The supervised local stack (what `neurodissect up` runs) when its processes fail.

One stack with a locked-down Ray head runs a small toy job once without
interruption; then the same job again while each of extractor, explainer,
captioner and the Ray head is SIGKILLed mid-stage. With no manual step each ends
SUCCEEDED with the baseline's results, and the supervisor counts the restart. A
hanging peer (SIGSTOP) makes the gateway's no-progress watchdog fail the job naming
it. The Ray head listens on loopback only and refuses a driver without its token;
its workers do not see the API token or the store secret. `up` exits non-zero on a
port it cannot bind, health by name is not fooled by another server on a service's
port, and a service that cannot stay up ends the stack.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from neurodissect.v1 import common_pb2

from services.cli import stack as stack_module
from services.cli.main import demo_layers, demo_spec
from services.cli.stack import LocalStack, StackError
from services.common.settings import SERVICES, Settings
from services.gateway.client import NeurodissectClient
from services.gateway.jobs import TERMINAL
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.timeout(1800)

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 900.0
API_TOKEN = "api-token-for-supervision-tests"
S3_SECRET = "s3-secret-for-supervision-tests"
# A stalled stage in the watchdog test: this much silence, then one retry.
NO_PROGRESS_S = 8.0
LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|\[::1\]|\[::ffff:127\.\d+\.\d+\.\d+\]):\d+$")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The four services and a Ray head, supervised, with an API token and a store secret."""
    root = tmp_path_factory.mktemp("supervised")
    # As a user of `up` would: secrets in the environment the stack is started from.
    secrets = pytest.MonkeyPatch()
    secrets.setenv("NEURODISSECT_AUTH_TOKEN", API_TOKEN)
    secrets.setenv("NEURODISSECT_S3_SECRET_KEY", S3_SECRET)
    settings = Settings(
        store_url=f"file://{root / 'store'}",
        cache_dir=str(REPO / "var" / "cache"),
        rpc_timeout_s=60.0,
        ray_num_cpus=1,
        auth_token=API_TOKEN,
        s3_secret_key=S3_SECRET,
    )
    started = LocalStack(settings, services=SERVICES, ray_head=True, log_dir=root / "logs")
    try:
        started.start(timeout=900)
        yield started
    finally:
        started.stop()
        secrets.undo()
    assert not started.ray_pids(), "Ray head processes left behind"


@pytest.fixture(scope="module")
def spec(stack: LocalStack) -> common_pb2.DissectionSpec:
    """A small toy job with an extract, an explain and a caption stage of several steps each."""
    with NeurodissectClient(stack.settings) as client:
        described = client.describe_model(common_pb2.ModelSpec(source="toy", name="toynet"))
    job_spec = demo_spec(demo_layers(described), ["netdissect", "milan"], 160, 32)
    job_spec.compute.batch_size = 16
    job_spec.compute.unit_block_size = 8
    return job_spec


def wait_terminal(client: NeurodissectClient, job_id: str) -> common_pb2.Job:
    """Poll the job until it is terminal, within JOB_TIMEOUT_S."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (job := client.get(job_id)).state not in TERMINAL:
        assert time.monotonic() < deadline, (
            f"job {job_id} not terminal after {JOB_TIMEOUT_S:.0f}s: "
            f"{common_pb2.JobState.Name(job.state)} {list(job.stages)}")
        time.sleep(1.0)
    return job


def all_results(client: NeurodissectClient, job: common_pb2.Job) -> dict[str, list[Any]]:
    return {layer: client.results(job.id, layer) for layer in job.spec.layers}


@pytest.fixture(scope="module")
def baseline(stack: LocalStack, spec: common_pb2.DissectionSpec) -> dict[str, list[Any]]:
    """The results of the toy job run without interruption."""
    with NeurodissectClient(stack.settings) as client:
        job = wait_terminal(client, client.submit(spec).id)
        assert job.state == common_pb2.SUCCEEDED, job.error
        return all_results(client, job)


def run_until(
    client: NeurodissectClient, spec: common_pb2.DissectionSpec, state: int, stage: str
) -> common_pb2.Job:
    """Submit the job and return it once `stage` has started and not finished."""
    job = client.submit(spec)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = client.get(job.id)
        progress = [s for s in job.stages if s.stage == stage]
        if job.state == state and progress and progress[0].done < progress[0].total:
            return job
        assert job.state not in TERMINAL, f"{stage} never seen in progress: {job}"
        assert time.monotonic() < deadline, f"job {job.id} never reached {stage} in progress"
        time.sleep(0.1)


def sigkill_process_of(name: str) -> Callable[[LocalStack], None]:
    def kill(stack: LocalStack) -> None:
        os.kill(stack.processes[name].pid, signal.SIGKILL)
    return kill


def sigkill_ray_head(stack: LocalStack) -> None:
    """SIGKILL every process of the head's session: `ray start`, GCS, raylet and the rest."""
    os.killpg(stack.processes["ray"].pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("victim", "state", "stage", "kill"),
    [
        ("extractor", common_pb2.EXTRACTING, "extract", sigkill_process_of("extractor")),
        ("explainer", common_pb2.EXPLAINING, "explain", sigkill_process_of("explainer")),
        ("ray", common_pb2.EXPLAINING, "explain", sigkill_ray_head),
        ("captioner", common_pb2.CAPTIONING, "caption", sigkill_process_of("captioner")),
    ],
)
def test_a_process_killed_mid_job_is_restarted_and_the_job_ends_identical(
    stack: LocalStack,
    spec: common_pb2.DissectionSpec,
    baseline: dict[str, list[Any]],
    victim: str,
    state: int,
    stage: str,
    kill: Callable[[LocalStack], None],
) -> None:
    if victim == "extractor":  # activations are cached by content: make the extractor work
        store = Path(stack.settings.store_url.removeprefix("file://"))
        for prefix in ("acts", "embed"):
            shutil.rmtree(store / prefix, ignore_errors=True)
    restarts = {name: stack.restarts(name) for name in [*SERVICES, "ray"]}
    with NeurodissectClient(stack.settings) as client:
        job = run_until(client, spec, state, stage)
        kill(stack)
        assert client.get(job.id).state not in TERMINAL, "killed too late"
        finished = wait_terminal(client, job.id)
        assert finished.state == common_pb2.SUCCEEDED, finished.error
        assert all_results(client, finished) == baseline
    assert stack.restarts(victim) == restarts[victim] + 1
    if victim == "ray":
        # The explainer's driver belonged to the dead cluster: it exits and is restarted.
        assert stack.restarts("explainer") > restarts["explainer"]


def test_the_ray_head_listens_on_loopback_only(stack: LocalStack) -> None:
    pids = set(stack.ray_pids())
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True)
    ours = [line.split() for line in listening.stdout.splitlines()
            if any(f"pid={pid}," in line for pid in pids)]
    ports = {int(fields[3].rsplit(":", 1)[1]) for fields in ours}
    assert int(stack.ray_address.rsplit(":", 1)[1]) in ports, listening.stdout
    assert all(LOOPBACK.match(fields[3]) for fields in ours), ours
    # From the machine's other addresses, nothing of the head answers.
    own = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout
    for address in own.split():
        for port in ports:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, port), timeout=5).close()


PROBE = textwrap.dedent("""
    import json, os, sys, ray
    ray.init(address=sys.argv[1], logging_level="ERROR")
    @ray.remote
    def peek():
        return sorted(k for k in os.environ if k.startswith(("NEURODISSECT_", "AWS_")))
    print("RAN", json.dumps(ray.get(peek.remote(), timeout=120)), flush=True)
""")


def probe(address: str, home: Path, **env: str) -> subprocess.Popen[str]:
    """A Ray driver that connects to `address` and runs one task (its output says how far)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "NEURODISSECT_"))}
    base["HOME"] = str(home)  # no ~/.ray/auth_token of the machine's
    return subprocess.Popen(
        [sys.executable, "-c", PROBE, address],
        env={**base, **stack_module.RAY_LOOPBACK_ENV, **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def output_within(process: subprocess.Popen[str], seconds: float) -> str:
    """What a probe printed until it exited or `seconds` passed (then it is killed)."""
    try:
        return process.communicate(timeout=seconds)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.communicate()[0]


def test_a_driver_without_the_token_cannot_run_a_task_and_workers_hold_no_secrets(
    stack: LocalStack, tmp_path: Path
) -> None:
    token = stack.ray_token_path
    assert token is not None and token.stat().st_mode & 0o077 == 0
    address = stack.ray_address
    without = probe(address, tmp_path)
    wrong = probe(address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    right = probe(address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    seen = {name: output_within(p, 90) for name, p in
            (("without", without), ("wrong", wrong), ("right", right))}
    for name in ("without", "wrong"):
        assert "RAN" not in seen[name], seen[name][-2000:]
        assert "Authentication token is missing or incorrect" in seen[name], seen[name][-2000:]
    ran = [line for line in seen["right"].splitlines() if line.startswith("RAN ")]
    assert ran == ["RAN []"], seen["right"][-2000:]


def test_a_stage_whose_peer_hangs_fails_naming_it(
    stack: LocalStack, spec: common_pb2.DissectionSpec, baseline: dict[str, list[Any]]
) -> None:
    settings = stack.settings
    stack.kill("gateway", signal.SIGTERM)
    stack.settings = settings.replace(stage_no_progress_s=NO_PROGRESS_S,
                                      stage_no_progress_retries=1)
    stack.start_service("gateway")
    stack.settings = settings
    stack.wait_healthy("gateway")
    captioner = stack.processes["captioner"]
    restarts = stack.restarts("captioner")
    try:
        with NeurodissectClient(settings) as client:
            job = run_until(client, spec, common_pb2.CAPTIONING, "caption")
            captioner.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            failed = wait_terminal(client, job.id)
        took = time.monotonic() - started
    finally:
        captioner.send_signal(signal.SIGCONT)
    assert failed.state == common_pb2.FAILED
    assert failed.error.startswith("caption: captioner made no progress for 8s in 2 attempts")
    assert 2 * NO_PROGRESS_S <= took < 2 * NO_PROGRESS_S + 60, took
    assert stack.restarts("captioner") == restarts  # a hanging process is not a crash


def test_up_exits_non_zero_when_a_port_cannot_be_bound(tmp_path: Path) -> None:
    port = free_port()
    decoy = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), decoy)
    decoy.add_insecure_port(f"127.0.0.1:{port}")
    decoy.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURODISSECT_")}
    env.update(
        NEURODISSECT_GATEWAY_ADDR=f"127.0.0.1:{port}",
        NEURODISSECT_EXTRACTOR_ADDR=f"127.0.0.1:{free_port()}",
        NEURODISSECT_EXPLAINER_ADDR=f"127.0.0.1:{free_port()}",
        NEURODISSECT_CAPTIONER_ADDR=f"127.0.0.1:{free_port()}",
        NEURODISSECT_METRICS_PORT="0", NEURODISSECT_UI_PORT="0",
        NEURODISSECT_STORE_URL=f"file://{tmp_path / 'store'}",
    )
    try:
        up = subprocess.run(
            [sys.executable, "-m", "services.cli.main", "up", "--no-ray-head",
             "--log-dir", str(tmp_path / "logs")],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )
    finally:
        decoy.stop(0)
    assert up.returncode == 3, up.stdout + up.stderr
    assert f"gateway cannot listen on 127.0.0.1:{port}" in up.stderr, up.stderr


def test_health_by_name_is_not_fooled_by_another_server_on_the_port(tmp_path: Path) -> None:
    port = free_port()
    decoy = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    serving = health.HealthServicer()
    serving.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(serving, decoy)
    decoy.add_insecure_port(f"127.0.0.1:{port}")
    decoy.start()
    local = LocalStack(
        Settings(store_url=f"file://{tmp_path / 'store'}", metrics_port=0, ui_port=0,
                 gateway_addr=f"127.0.0.1:{port}"),
        services=["gateway"], ray_head=False, free_ports=False, log_dir=tmp_path / "logs",
    )
    try:
        local.start_service("gateway")  # past start()'s own check of the port
        with pytest.raises(StackError, match=r"gateway exited with code 1") as failed:
            local.wait_healthy("gateway", timeout=120)
        assert f"Failed to bind to address 127.0.0.1:{port}" in str(failed.value)
    finally:
        local.stop()
        decoy.stop(0)


def test_a_service_that_cannot_stay_up_ends_the_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack_module, "CRASH_LOOP_LIMIT", 2)
    local = LocalStack(
        Settings(store_url=f"file://{tmp_path / 'store'}", metrics_port=0, ui_port=0),
        services=["gateway"], ray_head=False, log_dir=tmp_path / "logs",
    ).start(timeout=300)
    try:
        gateway = local.processes["gateway"]
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.wait(timeout=30)
        # Hold its port so that no restart can bind it.
        taken = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        taken.add_insecure_port(local.address("gateway"))
        taken.start()
        try:
            assert local.failed.wait(timeout=240), "the supervisor never gave up"
        finally:
            taken.stop(0)
        assert local.restarts("gateway") == 2
        assert "gateway crashed 3 times in a row" in local.failure
    finally:
        local.stop()
