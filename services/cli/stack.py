"""The local stack: the four services as separate processes, plus a local Ray head, supervised.

`neurodissect up` and `neurodissect demo` run one; the integration tests too. Each
service is `python -m services.cli.main serve NAME` with its port, metrics port
and peer addresses in its environment (`NEURODISSECT_*`), and its output in
`{log_dir}/{name}.log`. Every port the stack hands out is distinct; a port that
cannot be bound fails the start with a message naming it, and health is asked of
each service by its gRPC name, so another server on the same port never passes.

With `extractors=N` (`up --extractors N`) N extractor processes share each job's images
(`extractor`, `extractor-1`, ...; the others on consecutive ports after the four
services'), each with `torch_threads` = usable cores // N so that together they do not
oversubscribe the machine; the gateway gets their addresses as `extractor_addrs`.

The Ray head (`ray start --head --block`) starts Python workers for tasks only,
and stops them when idle (`ray_workers.LAZY_WORKER_CONFIG`), so an idle stack holds
none; `footprint` says what each process holds. It is locked down: every server of it
listens on loopback only, it requires Ray's token authentication with a token
generated per stack (a 0600 file in a private directory, handed to the explainer as
`RAY_AUTH_TOKEN_PATH`), its processes and workers run in an environment without
the API token or object-store secrets (tasks get the store credentials they need
as arguments), and its logs rotate at a bounded size.

A supervisor thread restarts whatever exits (a service or the Ray head, on the
same ports) with exponential backoff, logs it and counts it in `restarts`; after
`CRASH_LOOP_LIMIT` quick crashes in a row it gives up, stops nothing by itself and
reports `failure` (`up` then exits non-zero). Stopping sends SIGTERM (services
drain gracefully), then SIGKILL to whatever is left after a grace period.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from services.cli.footprint import ProcessMemory, footprint
from services.common.client import wait_healthy
from services.common.ray_workers import LAZY_WORKER_CONFIG
from services.common.settings import SERVICES, Settings, usable_cores

log = logging.getLogger(__name__)

RAY_START_TIMEOUT_S = 90.0
# A Ray head drains its node for up to 30 s after SIGTERM.
RAY_DRAIN_S = 35.0
# Restart backoff: the first wait, its cap, and how long a process must stay up for the
# next crash to count as a fresh one rather than part of a crash loop.
RESTART_FIRST_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 30.0
STABLE_AFTER_S = 60.0
# Quick crashes in a row after which the supervisor gives up on the stack.
CRASH_LOOP_LIMIT = 5
SUPERVISE_POLL_S = 0.5
# Ray's own switch that keeps a node's IP at loopback: without it `ray start` and
# `ray.init` replace 127.0.0.1 by the host's address and serve on every interface.
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray rotates its logs (the driver's too) at this size, keeping this many old files.
RAY_LOG_ROTATION_ENV = {"RAY_ROTATION_MAX_BYTES": str(16 << 20), "RAY_ROTATION_BACKUP_COUNT": "2"}
# Environment variables the Ray head and its workers never see.
SECRET_ENV_PREFIXES = ("NEURODISSECT_", "AWS_", "RAY_ADDRESS", "RAY_AUTH_TOKEN")
# Marks the processes of one stack's Ray head (workers included) for cleanup.
RAY_HEAD_MARK = "NDX_RAY_HEAD"


def health_name(service: str) -> str:
    """The grpc.health.v1 service name a service registers (`neurodissect.v1.Gateway`, ...)."""
    return f"neurodissect.v1.{service.capitalize()}"


def free_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """A TCP port that is free on `host` right now and not in `taken` (which it joins)."""
    taken = set() if taken is None else taken
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could not listen on host:port now (as gRPC binds: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def replica_names(extractors: int) -> list[str]:
    """Process names of the extractor replicas: `extractor`, `extractor-1`, ..."""
    return ["extractor"] + [f"extractor-{k}" for k in range(1, extractors)]


def service_of(name: str) -> str:
    """The service a stack process runs (`extractor-1` runs the extractor)."""
    return name.split("-", 1)[0]


def available_services() -> list[str]:
    """The services whose server module is installed (`services.<name>.server`)."""
    found = []
    for name in SERVICES:
        try:
            if importlib.util.find_spec(f"services.{name}.server") is not None:
                found.append(name)
        except ModuleNotFoundError:
            continue
    return found


def scrubbed_environment() -> dict[str, str]:
    """The environment of this process without the API token, store secrets or Ray address."""
    return {k: v for k, v in os.environ.items() if not k.startswith(SECRET_ENV_PREFIXES)}


def _processes_marked(mark: str) -> list[int]:
    """PIDs of this user's processes whose environment holds `RAY_HEAD_MARK=mark`."""
    wanted = f"{RAY_HEAD_MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


class StackError(RuntimeError):
    """A service of the local stack did not start or did not stay up."""


@dataclass
class Supervised:
    """What the supervisor knows of one process: restarts, and when it last started."""

    restarts: int = 0
    quick_crashes: int = 0
    started_at: float = 0.0
    # Deliberately stopped (`LocalStack.kill`): not restarted until started again.
    held: bool = False


class LocalStack:
    """Starts, supervises and stops the services of one machine as child processes."""

    def __init__(
        self,
        settings: Settings,
        services: Sequence[str] = SERVICES,
        ray_head: bool = True,
        free_ports: bool = True,
        log_dir: str | Path = "var/log",
        supervise: bool = True,
        on_restart: Callable[[str, str], None] | None = None,
        extractors: int = 1,
    ) -> None:
        if extractors < 1:
            raise StackError(f"--extractors {extractors}: at least one extractor is needed")
        replicas = replica_names(extractors)[1:]
        self.services = [
            process for name in services
            for process in ([name, *replicas] if name == "extractor" else [name])
        ]
        self.extractors = extractors
        self.ray_head = ray_head
        self.supervise = supervise
        self.on_restart = on_restart
        self.log_dir = Path(log_dir)
        host = settings.host
        taken: set[int] = set()
        self.ports: dict[str, int] = {}
        self.metrics_ports: dict[str, int] = {}
        for name in SERVICES:
            if free_ports:
                self.ports[name] = free_port(host, taken)
                self.metrics_ports[name] = free_port(host, taken)
            else:
                self.ports[name] = int(settings.address_of(name).rsplit(":", 1)[1])
                self.metrics_ports[name] = settings.service_metrics_port(name)
        for k, name in enumerate(replicas, 1):
            if free_ports:
                self.ports[name] = free_port(host, taken)
                self.metrics_ports[name] = free_port(host, taken)
            else:
                self.ports[name] = max(self.ports[s] for s in SERVICES) + k
                self.metrics_ports[name] = (
                    max(self.metrics_ports[s] for s in SERVICES) + k
                    if self.metrics_ports["extractor"] else 0
                )
        changes: dict[str, object] = {
            f"{name}_addr": f"{host}:{self.ports[name]}" for name in SERVICES
        }
        if replicas:
            changes["extractor_addrs"] = ",".join(
                f"{host}:{self.ports[name]}" for name in replica_names(extractors))
            changes["torch_threads"] = settings.torch_threads or max(
                1, usable_cores() // extractors)
        if free_ports and settings.ui_port:
            changes["ui_port"] = free_port(host, taken)
        self.settings = settings.replace(**changes)
        self._check_distinct()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.supervised: dict[str, Supervised] = {}
        self.failure = ""
        self.failed = threading.Event()
        self._logs: list[IO[bytes]] = []
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.ray_address = ""
        self._ray_ports: dict[str, int] = {}
        self._ray_dir: Path | None = None

    def _check_distinct(self) -> None:
        """StackError when two of the stack's servers would be handed the same port."""
        owners: dict[int, str] = {}
        handed = [(f"{n}", p) for n, p in self.ports.items() if n in self.services]
        handed += [(f"{n} metrics", p) for n, p in self.metrics_ports.items() if n in self.services]
        if "gateway" in self.services and self.settings.ui_port:
            handed.append(("gateway web UI", self.settings.ui_port))
        for name, port in handed:
            if port and port in owners:
                raise StackError(f"{owners[port]} and {name} would both listen on port {port}")
            owners[port] = name

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> LocalStack:
        """Start Ray (if asked) and every service; wait until all are healthy; supervise."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.services:
                port = self.ports[name]
                if port_in_use(self.settings.host, port):
                    raise StackError(f"{name} cannot listen on {self.settings.host}:{port}: "
                                     "the port is in use")
            if self.ray_head:
                self._prepare_ray()
                self._start_ray()
            for name in self.services:
                self.start_service(name)
            for name in self.services:
                self.wait_healthy(name, timeout)
        except BaseException:
            self.stop()
            raise
        if self.supervise:
            self._supervisor = threading.Thread(
                target=self._supervise, name="stack-supervisor", daemon=True
            )
            self._supervisor.start()
        return self

    def start_service(self, name: str) -> subprocess.Popen[bytes]:
        """Start one service process (an extractor replica too; again, after a kill)."""
        env = {**os.environ, **self.settings.environment(), **RAY_LOOPBACK_ENV}
        env["NEURODISSECT_PORT"] = str(self.ports[name])
        env["NEURODISSECT_METRICS_PORT"] = str(self.metrics_ports[name])
        env.pop("RAY_ADDRESS", None)
        if name == "explainer":
            env.update(self._ray_client_environment())
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_file = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(log_file)
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "serve", service_of(name)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with self._lock:
            self.processes[name] = process
            state = self.supervised.setdefault(name, Supervised())
            state.started_at, state.held = time.monotonic(), False
        return process

    def wait_healthy(self, name: str, timeout: float = 180.0) -> None:
        """Wait until a service answers health for its own name with SERVING.

        StackError if it exits first (a port it could not bind) or after `timeout`.
        """
        deadline = time.monotonic() + timeout
        while True:
            process = self.processes[name]
            if process.poll() is not None:
                raise StackError(
                    f"{name} exited with code {process.returncode}; see "
                    f"{self.log_dir / (name + '.log')}:\n{self.log_tail(name)}"
                )
            try:
                wait_healthy(self.address(name), self.settings, timeout=2.0,
                             service=health_name(service_of(name)))
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise StackError(
                        f"{name} did not answer health for {health_name(service_of(name))} on "
                        f"{self.address(name)} within {timeout:.0f}s"
                    ) from None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop one service with a signal and wait for it; it stays down until started again."""
        with self._lock:
            self.supervised.setdefault(name, Supervised()).held = True
            process = self.processes[name]
        process.send_signal(sig)
        process.wait(timeout=60)

    def stop(self, grace: float = 15.0) -> None:
        """Stop supervising, stop every service, then Ray (which drains for up to 30 s)."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=RAY_START_TIMEOUT_S + 10)
        services = sorted((n for n in self.processes if n != "ray"), key=lambda n: n != "gateway")
        self._terminate(services, grace)
        if "ray" in self.processes:
            self._terminate(["ray"], grace + RAY_DRAIN_S)
            self._kill_ray_leftovers()
        self.processes.clear()
        for log_file in self._logs:
            log_file.close()
        self._logs.clear()
        if self._ray_dir is not None:
            shutil.rmtree(self._ray_dir, ignore_errors=True)
            self._ray_dir = None

    def _terminate(self, names: Sequence[str], grace: float) -> None:
        for name in names:
            if self.processes[name].poll() is None:
                self.processes[name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name in names:
            process = self.processes[name]
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # -- supervision -----------------------------------------------------------------------

    def restarts(self, name: str) -> int:
        """How many times the supervisor restarted `name` ('ray' for the Ray head)."""
        with self._lock:
            return self.supervised[name].restarts if name in self.supervised else 0

    def _supervise(self) -> None:
        while not self._stopping.wait(SUPERVISE_POLL_S):
            for name in list(self.processes):
                with self._lock:
                    process, state = self.processes[name], self.supervised[name]
                    if state.held or process.poll() is None:
                        continue
                try:
                    self._restart(name, process.returncode, state)
                except (OSError, StackError) as exc:
                    self._give_up(f"{name} could not be restarted: {exc}")
                if self.failed.is_set():
                    return

    def _restart(self, name: str, code: int, state: Supervised) -> None:
        uptime = time.monotonic() - state.started_at
        state.quick_crashes = state.quick_crashes + 1 if uptime < STABLE_AFTER_S else 1
        if state.quick_crashes > CRASH_LOOP_LIMIT:
            self._give_up(
                f"{name} crashed {state.quick_crashes} times in a row, each within "
                f"{STABLE_AFTER_S:.0f}s of its start (last exit code {code}); see "
                f"{self.log_dir / (name + '.log')}:\n{self.log_tail(name)}"
            )
            return
        delay = min(RESTART_FIRST_DELAY_S * 2 ** (state.quick_crashes - 1), RESTART_MAX_DELAY_S)
        message = (f"{name} exited with code {code} after {uptime:.0f}s; restarting in "
                   f"{delay:.0f}s (restart {state.restarts + 1})")
        log.warning("%s", message)
        if self._stopping.wait(delay):
            return
        if name == "ray":
            self._kill_ray_leftovers()
            self._start_ray()
            with self._lock:
                state.started_at = time.monotonic()
        else:
            self.start_service(name)
        with self._lock:
            state.restarts += 1
        if self.on_restart is not None:
            self.on_restart(name, message)

    def _give_up(self, failure: str) -> None:
        log.error("the local stack gives up: %s", failure)
        self.failure = failure
        self.failed.set()

    # -- facts -----------------------------------------------------------------------------

    def address(self, name: str) -> str:
        """host:port of a service (or an extractor replica)."""
        return f"{self.settings.host}:{self.ports[name]}"

    def footprint(self) -> list[ProcessMemory]:
        """PSS of every live process of the stack, each counted once.

        A service's row includes its children (the local Ray an explainer started
        without a head); 'ray' is the Ray head's every process, workers included.
        """
        with self._lock:
            owners = {name: [p.pid] for name, p in self.processes.items() if p.poll() is None}
        if "ray" in owners:
            owners["ray"] += self.ray_pids()
        return footprint(owners)

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines of a service's log."""
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # -- the Ray head ----------------------------------------------------------------------

    @property
    def ray_token_path(self) -> Path | None:
        """The file holding the Ray head's authentication token (None without a head)."""
        return self._ray_dir / "auth_token" if self._ray_dir is not None else None

    def ray_pids(self) -> list[int]:
        """Every live process of the Ray head: its `ray start`, servers and workers."""
        return _processes_marked(str(self._ray_dir)) if self._ray_dir is not None else []

    def _ray_client_environment(self) -> dict[str, str]:
        """How the explainer reaches Ray: the head's address and token, or a local Ray."""
        env = dict(RAY_LOG_ROTATION_ENV)
        if self.ray_address and self.ray_token_path is not None:
            env.update(RAY_ADDRESS=self.ray_address, RAY_AUTH_MODE="token",
                       RAY_AUTH_TOKEN_PATH=str(self.ray_token_path))
        return env

    def _prepare_ray(self) -> None:
        """A private directory (short: Ray's socket paths) with a fresh token; fixed ports."""
        self._ray_dir = Path(tempfile.mkdtemp(prefix="ndx-ray-", dir="/tmp"))
        token = self._ray_dir / "auth_token"
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
        host, taken = self.settings.host, {*self.ports.values(), *self.metrics_ports.values()}
        flags = ("port", "ray-client-server-port", "dashboard-agent-listen-port",
                 "node-manager-port", "object-manager-port", "metrics-export-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port")
        self._ray_ports = {flag: free_port(host, taken) for flag in flags}

    def _start_ray(self) -> None:
        assert self._ray_dir is not None, "_prepare_ray first"
        host = self.settings.host
        ray = Path(sys.executable).with_name("ray")
        command = [
            str(ray), "start", "--head", "--block", f"--node-ip-address={host}",
            f"--temp-dir={self._ray_dir / 'ray'}", "--include-dashboard=false",
            "--disable-usage-stats", f"--system-config={json.dumps(LAZY_WORKER_CONFIG)}",
            *(f"--{flag}={port}" for flag, port in self._ray_ports.items()),
        ]
        if self.settings.ray_num_cpus:
            command.append(f"--num-cpus={self.settings.ray_num_cpus}")
        log_path = self.log_dir / "ray.log"
        log_file = log_path.open("ab")
        self._logs.append(log_file)
        started_at = log_path.stat().st_size
        env = {
            **scrubbed_environment(), **RAY_LOOPBACK_ENV, **RAY_LOG_ROTATION_ENV,
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.ray_token_path),
            RAY_HEAD_MARK: str(self._ray_dir),
        }
        process = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        with self._lock:
            self.processes["ray"] = process
            self.supervised.setdefault("ray", Supervised()).started_at = time.monotonic()
        deadline = time.monotonic() + RAY_START_TIMEOUT_S
        while True:
            with log_path.open("rb") as read:
                read.seek(started_at)
                if b"Ray runtime started" in read.read():
                    break
            if process.poll() is not None:
                raise StackError(f"the Ray head exited with code {process.returncode}; "
                                 f"see {log_path}")
            if time.monotonic() > deadline:
                raise StackError(f"the Ray head did not start within {RAY_START_TIMEOUT_S:.0f}s;"
                                 f" see {log_path}")
            time.sleep(0.3)
        self.ray_address = f"{host}:{self._ray_ports['port']}"

    def _kill_ray_leftovers(self) -> None:
        """SIGKILL whatever of the Ray head still runs (servers, workers orphaned by a crash)."""
        deadline = time.monotonic() + 30
        while (left := self.ray_pids()) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
