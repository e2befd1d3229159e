"""The idle local stack (what `neurodissect up` runs) holds at most 1 GiB, and no torch.

Services import torch, torchvision, open_clip, Ray and matplotlib only when a job
needs them, and the Ray head starts no worker before a task: the stack's summed
proportional set size stays under the issue's 1 GiB.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli.footprint import ProcessMemory
from services.cli.stack import LocalStack
from services.common.settings import SERVICES, Settings

pytestmark = pytest.mark.timeout(600)

IDLE_LIMIT_BYTES = 1 << 30
SETTLE_S = 5.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("idle")
    settings = Settings(store_url=f"file://{root / 'store'}", ray_num_cpus=2)
    started = LocalStack(settings, services=SERVICES, ray_head=True, log_dir=root / "logs")
    try:
        started.start(timeout=300)
        yield started
    finally:
        started.stop()


def maps_torch(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    return False


def test_the_idle_stack_holds_at_most_1_gib_and_no_torch(stack: LocalStack) -> None:
    time.sleep(SETTLE_S)
    rows: list[ProcessMemory] = stack.footprint()
    owners = {row.owner for row in rows}
    assert owners == {*SERVICES, "ray"}, f"processes measured: {owners}"
    total = sum(row.pss_bytes for row in rows)
    table = "\n".join(f"{r.owner} {r.pid} {r.pss_bytes >> 20} MiB {r.command[:60]}" for r in rows)
    assert total <= IDLE_LIMIT_BYTES, f"idle stack holds {total >> 20} MiB:\n{table}"
    assert not [r for r in rows if maps_torch(r.pid)], f"an idle process loaded torch:\n{table}"
    assert not [r for r in rows if r.command.startswith("ray::IDLE")], f"idle workers:\n{table}"
