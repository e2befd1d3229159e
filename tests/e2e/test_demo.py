"""What a user does first: `make run` (the demo), then `neurodissect up` serving its results."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.cli.demo_figures import block_in
from services.common.client import wait_healthy
from services.common.settings import Settings

# The demo at the size `make run` uses (400 images at 64 px), then `up` over its store.
pytestmark = pytest.mark.timeout(1800)

REPO = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT_S = 900


def neurodissect(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli.main", "--store-url", f"file://{store}",
            "--cache-dir", str(REPO / "var" / "cache"), *args]


def children_of(pid: int) -> list[int]:
    listed = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                            text=True, check=False).stdout
    return [int(p) for p in listed.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """Run the demo as `make run` does, on a fresh store; return (store, job id, its output)."""
    store = tmp_path_factory.mktemp("demo") / "store"
    run = subprocess.run(
        neurodissect(store, "demo", "--no-ray-head", "--show", "4",
                     "--log-dir", str(store.parent / "logs")),
        capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    job_id = next(line.split()[1] for line in run.stdout.splitlines() if line.startswith("job: "))
    return store, job_id, run.stdout


def test_the_demo_prints_its_job_results_and_outputs(demo: tuple[Path, str, str]) -> None:
    store, job_id, output = demo
    assert "state: SUCCEEDED" in output
    assert "layer " in output and "netdissect" in output
    assert f"reports/{job_id}/index.html" in output
    assert (store / "reports" / job_id / "index.html").is_file()
    assert (store / "jobs" / job_id / "job.json").is_file()


def test_the_readme_shows_the_figures_the_demo_prints(demo: tuple[Path, str, str]) -> None:
    _, _, output = demo
    printed = block_in(output)
    assert printed, output[-3000:]
    assert "| layer3 | 64 |" in printed and "| linear |" in printed
    assert block_in((REPO / "README.md").read_text()) == printed, "run `make readme-figures`"


def test_up_serves_the_demo_results_and_stops_cleanly_on_sigterm(
    demo: tuple[Path, str, str]
) -> None:
    store, job_id, _ = demo
    up = subprocess.Popen(
        neurodissect(store, "up", "--free-ports", "--log-dir", str(store.parent / "logs-up")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in up.stdout or []],
                     daemon=True).start()
    gateway, seen = "", []
    deadline = time.monotonic() + 600
    try:
        while not (seen and seen[-1].startswith("up;")):
            assert time.monotonic() < deadline and up.poll() is None, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            if seen[-1].startswith("export NEURODISSECT_GATEWAY_ADDR="):
                gateway = seen[-1].strip().split("=", 1)[1]
        children = children_of(up.pid)
        assert len(children) == 5  # four services and the Ray head
        shown = subprocess.run(
            neurodissect(store, "--gateway-addr", gateway, "results", job_id, "--format", "json",
                         "--layer", json.loads((store / "jobs" / job_id / "job.json")
                                               .read_text())["spec"]["layers"][0]),
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)[0]["unit"] == 0
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    assert not [pid for pid in children if alive(pid)]
    with pytest.raises(TimeoutError):
        wait_healthy(gateway, Settings(), timeout=1.0)
