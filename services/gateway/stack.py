"""The local stack: the four services as separate processes, plus a local Ray head.

`neurodissect up` and `neurodissect demo` run one; the integration tests too. Each
service is `python -m services.gateway.cli serve NAME` with its port, metrics port
and peer addresses in its environment (`NEURODISSECT_*`), and its output in
`{log_dir}/{name}.log`. The Ray head (`ray start --head --block`, on loopback) is
handed to the explainer as `RAY_ADDRESS`, with the same `RAY_AUTH_MODE` (the
environment's, else `disabled`: the head listens on loopback only); without it the
explainer starts Ray in-process. Stopping sends SIGTERM (services drain gracefully), then SIGKILL to
whatever is left after a grace period.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from services.common.client import wait_healthy
from services.common.settings import SERVICES, Settings

RAY_START_TIMEOUT_S = 90.0
# A Ray head drains its node for up to 30 s after SIGTERM.
RAY_DRAIN_S = 35.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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


def ray_auth_mode() -> str:
    """`RAY_AUTH_MODE` of the local Ray head and the explainer: the environment's, else off."""
    return os.environ.get("RAY_AUTH_MODE", "disabled")


class StackError(RuntimeError):
    """A service of the local stack did not start."""


class LocalStack:
    """Starts and stops the services of one machine as child processes."""

    def __init__(
        self,
        settings: Settings,
        services: Sequence[str] = SERVICES,
        ray_head: bool = True,
        free_ports: bool = True,
        log_dir: str | Path = "var/log",
    ) -> None:
        self.services = list(services)
        self.ray_head = ray_head
        self.log_dir = Path(log_dir)
        self.ports: dict[str, int] = {}
        self.metrics_ports: dict[str, int] = {}
        for name in SERVICES:
            port = free_port(settings.host) if free_ports else settings.service_port(name)
            self.ports[name] = port
            self.metrics_ports[name] = (
                free_port(settings.host) if free_ports else settings.service_metrics_port(name)
            )
        addresses = {f"{name}_addr": f"{settings.host}:{self.ports[name]}" for name in SERVICES}
        self.settings = settings.replace(**addresses)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self.ray_address = ""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> LocalStack:
        """Start Ray (if asked) and every service; wait until all are healthy."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.ray_head:
                self._start_ray()
            for name in self.services:
                self.start_service(name)
            for name in self.services:
                self.wait_healthy(name, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_service(self, name: str) -> subprocess.Popen[bytes]:
        """Start one service process (again, after a kill) and return it."""
        env = {**os.environ, **self.settings.environment()}
        env["NEURODISSECT_PORT"] = str(self.ports[name])
        env["NEURODISSECT_METRICS_PORT"] = str(self.metrics_ports[name])
        env.pop("RAY_ADDRESS", None)
        if name == "explainer" and self.ray_address:
            env["RAY_ADDRESS"] = self.ray_address
            env["RAY_AUTH_MODE"] = ray_auth_mode()
        log = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        process = subprocess.Popen(
            [sys.executable, "-m", "services.gateway.cli", "serve", name],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def wait_healthy(self, name: str, timeout: float = 180.0) -> None:
        """Wait until a service answers health with SERVING; StackError if it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            process = self.processes[name]
            if process.poll() is not None:
                raise StackError(
                    f"{name} exited with code {process.returncode}; see "
                    f"{self.log_dir / (name + '.log')}:\n{self.log_tail(name)}"
                )
            try:
                wait_healthy(self.address(name), self.settings, timeout=2.0)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise StackError(f"{name} not healthy after {timeout:.0f}s") from None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal to one service and wait for it to exit."""
        process = self.processes[name]
        process.send_signal(sig)
        process.wait(timeout=60)

    def stop(self, grace: float = 15.0) -> None:
        """Stop every service, then Ray (which drains for up to 30 s); SIGKILL after grace."""
        services = sorted((n for n in self.processes if n != "ray"), key=lambda n: n != "gateway")
        self._terminate(services, grace)
        self._terminate([n for n in self.processes if n == "ray"], grace + RAY_DRAIN_S)
        self.processes.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

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

    # -- facts -----------------------------------------------------------------------------

    def address(self, name: str) -> str:
        """host:port of a service."""
        return self.settings.address_of(name)

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines of a service's log."""
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _start_ray(self) -> None:
        host = self.settings.host
        port = free_port(host)
        ray = Path(sys.executable).with_name("ray")
        command = [
            str(ray), "start", "--head", "--block",
            f"--node-ip-address={host}", f"--port={port}",
            f"--ray-client-server-port={free_port(host)}",
            f"--dashboard-agent-listen-port={free_port(host)}",
            "--include-dashboard=false", "--disable-usage-stats",
        ]
        if self.settings.ray_num_cpus:
            command.append(f"--num-cpus={self.settings.ray_num_cpus}")
        log_path = self.log_dir / "ray.log"
        log = log_path.open("wb")
        self._logs.append(log)
        process = subprocess.Popen(
            command,
            env={**os.environ, "RAY_AUTH_MODE": ray_auth_mode()},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes["ray"] = process
        deadline = time.monotonic() + RAY_START_TIMEOUT_S
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"the Ray head did not start; see {log_path}")
            time.sleep(0.3)
        self.ray_address = f"{host}:{port}"
