"""Ray scaling of the explain stage: the same Explain on a local Ray with 1 and with 2 workers.

Input (`stored_broden`): `IMAGES` Broden-like images and a ResNet-18 layer4-like layer
(512 units at 7×7) stored as a job stores them. What is timed is what an Explain call
runs for Network Dissection (`servicer.explain`: its 64-unit block tasks on Ray, each
streaming the stored activation chunks and decoded labels), in wall-clock seconds,
on a local Ray started with `num_cpus` 1, then 2. The labels are decoded once before
(a probe set's decoded labels are shared by every later job), and each Ray runs a
warm-up Explain first so that its workers are started and have imported the method;
the two configurations alternate over `ROUNDS` rounds and each figure is the fastest
of its rounds (the one least disturbed by other processes on the shared machine).

ratio = speedup / 2 (parallel efficiency with 2 workers); target 0.85. The machine's
load average is recorded in the notes: other processes competing for the 2 cores
lower the 2-worker speedup, not the work.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import ray

from bench.stored_broden import netdissect_plan, write_probe
from services.common.settings import Settings
from services.common.store import LocalStore
from services.explainer import sharding
from services.explainer.servicer import explain

IMAGES = 3000
BLOCK = 64
ROUNDS = 3
WORKERS = (1, 2)
TARGET = 0.85


def timed_explain(store: LocalStore, job: str, unit_end: int = 0) -> float:
    """Wall-clock seconds of one Explain of Network Dissection over units [0, unit_end)."""
    plan = netdissect_plan(store, BLOCK, job)
    if unit_end:
        plan = dataclasses.replace(plan, unit_end=unit_end)
    started = time.perf_counter()
    for _ in explain(Settings(store_url=store.url), store, plan):
        pass
    return time.perf_counter() - started


def run() -> list[dict[str, object]]:
    seconds: dict[int, list[float]] = {k: [] for k in WORKERS}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as root:
        store = LocalStore(root)
        write_probe(store, IMAGES)
        for r in range(ROUNDS):
            for workers in WORKERS:
                ray.shutdown()
                sharding.connect(Settings(ray_num_cpus=workers))
                timed_explain(store, f"warm-{r}-{workers}", unit_end=BLOCK * workers)
                seconds[workers].append(timed_explain(store, f"run-{r}-{workers}"))
                loads.append(os.getloadavg()[0])
        ray.shutdown()
    one, two = (min(seconds[k]) for k in WORKERS)
    speedup = one / two
    print(f"ray_scaling: 1 worker {one:.1f} s, 2 workers {two:.1f} s, speedup {speedup:.2f}, "
          f"efficiency {speedup / 2:.2f}")
    runs = "; ".join(f"{k}: " + "/".join(f"{s:.1f}" for s in seconds[k]) for k in WORKERS)
    return [
        {
            "name": "ray_scaling",
            "ours": speedup / 2,
            "baseline": 1.0,
            "unit": "efficiency",
            "ratio": speedup / 2,
            "target": TARGET,
            "notes": (
                f"Explain (NetDissect, {BLOCK}-unit block tasks over stored chunks) of 512 "
                f"units 7x7 on {IMAGES} Broden-like images, local Ray with 1 vs 2 workers: "
                f"fastest of {ROUNDS} rounds {one:.1f} s vs {two:.1f} s wall-clock (every run, "
                f"s, by workers: {runs}), "
                f"speedup {speedup:.2f}; load average during the runs "
                f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores (other "
                f"processes competing for the cores); ours = efficiency = speedup / 2"
            ),
        }
    ]


if __name__ == "__main__":
    for record in run():
        print(record)
