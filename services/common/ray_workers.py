"""When a Ray we start runs its Python workers: for tasks only, and not for long after.

By default a raylet starts one idle Python worker per CPU when the first driver
connects and keeps that many idle workers for good: each holds Ray (~45 MiB), and
after a job whatever its tasks imported (torch, scipy: hundreds of MiB). The Ray
that `neurodissect up` starts (its head) and the local Ray that an explainer starts
use `LAZY_WORKER_CONFIG` instead (Ray's `_system_config`, `ray start --system-config`):
no worker before a task needs one, and a worker idle for `IDLE_WORKER_EXIT_S`
exits. A job's unit blocks run back to back on the same workers, so the start-up
cost (a fresh Python importing the method's libraries) is paid about once per
worker and job. A cluster we only join keeps its own settings.
"""

from __future__ import annotations

IDLE_WORKER_EXIT_S = 30
LAZY_WORKER_CONFIG: dict[str, bool | int] = {
    "enable_worker_prestart": False,
    "prestart_worker_first_driver": False,
    # Idle workers beyond this many are stopped once idle long enough.
    "num_workers_soft_limit": 0,
    "idle_worker_killing_time_threshold_ms": IDLE_WORKER_EXIT_S * 1000,
}
