"""Network Dissection's IoU tally as a job runs it vs NetDissect-Lite's loop, same input.

Input (`stored_broden`): Broden-like images stored as a job stores them (112×112 label
maps, about 20 labels each out of 1,241; 512 units at 7×7 as float16 chunks of 64
units × 256 images).

Ours: the tally of the explainer's 64-unit block tasks: the label chunks decoded once
for the grid (`decoded_labels.decode_chunk`, `NetDissect.prepare`'s tasks), then per
block and image chunk, its activations read from the stored chunks, the decoded
labels read back, `count_decoded` and `IoUTally.add`, as `NetDissect.block_rows` runs
them; the blocks' thresholds are computed first and not timed (`netdissect_broden`
times the whole stage). Reference: NetDissect-Lite's `tally_job` loop
(`broden_like.baseline_tally`) on the first chunk, same thresholds, labels in memory;
its counts must equal ours. The two sides alternate over `ROUNDS` rounds and each
rate is the median of its rounds; times are CPU seconds of this process (the machine is
shared). The block task's peak memory is traced on one full block task.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import tracemalloc

import numpy as np

from bench.broden_like import baseline_tally, label_categories
from bench.stored_broden import (
    CHUNK,
    DATASET,
    check_first_chunk,
    netdissect_plan,
    write_probe,
)
from services.common.activations import iter_units
from services.common.probe_format import read_concepts
from services.common.store import LocalStore
from services.explainer import decoded_labels
from services.explainer.explain_plan import ExplainPlan
from services.explainer.methods.netdissect import NetDissect
from services.explainer.netdissect import IoUTally, unit_thresholds
from services.explainer.unit_masks import count_decoded

IMAGES = 2048
ROUNDS = 3
BLOCK = 64
BRODEN_IMAGES = 63305
TARGET = 50.0


def _tally_blocks(store: LocalStore, plan: ExplainPlan, thresholds: np.ndarray) -> float:
    """CPU seconds of decoding the labels and tallying every block against them."""
    table = read_concepts(store, DATASET)
    band_start = decoded_labels.grid_bands(table, plan.manifest.shape[2:])
    categories = table.label_categories()
    started = time.process_time()
    for i0, i1 in table.chunk_ranges():
        decoded_labels.decode_chunk(store, table, band_start, i0, i1)
    for u0, u1 in plan.blocks():
        tally = IoUTally(thresholds[u0:u1], categories, len(table.categories), first_unit=u0)
        for i0, acts in iter_units(store, plan.manifest, u0, u1):
            labels = decoded_labels.read_decoded(store, table, band_start, i0, i0 + len(acts))
            tally.add(count_decoded(acts, labels, tally.thresholds))
        tally.result()
    return time.process_time() - started


def _block_task_peak_mib(store: LocalStore, plan: ExplainPlan) -> float:
    """Peak memory allocated by one whole block task (thresholds, tally, rows) of BLOCK units."""
    method = NetDissect()
    table = read_concepts(store, DATASET)
    band_start = decoded_labels.grid_bands(table, plan.manifest.shape[2:])
    tracemalloc.start()
    try:
        method.block_rows(store, plan, method.params(plan.spec), 0, BLOCK, table, band_start)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def run() -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as root:
        store = LocalStore(root)
        probe = write_probe(store, IMAGES)
        acts, first = probe.acts, probe.labels[0]
        thresholds = unit_thresholds(lambda: iter([acts]))
        plan = netdissect_plan(store, BLOCK)
        ours_rates, baseline_rates = [], []
        for _ in range(ROUNDS):
            started = time.process_time()
            reference = baseline_tally(acts[:CHUNK], first, thresholds, label_categories())
            baseline_rates.append(CHUNK / (time.process_time() - started))
            ours_rates.append(IMAGES / _tally_blocks(store, plan, thresholds))
        check_first_chunk(store, thresholds, reference)
        peak = _block_task_peak_mib(store, plan)
    ours, baseline = statistics.median(ours_rates), statistics.median(baseline_rates)
    firing = float((acts.max(axis=(2, 3)) > thresholds).mean())
    print(
        f"iou_tally: ours {ours:.0f} images/s, baseline {baseline:.1f} images/s; projected "
        f"Broden, one core: ours {BRODEN_IMAGES / ours / 60:.2f} min, baseline "
        f"{BRODEN_IMAGES / baseline / 60:.1f} min; one block task peaks at {peak:.0f} MiB"
    )
    return [
        {
            "name": "iou_tally",
            "ours": ours,
            "baseline": baseline,
            "unit": "images/s",
            "ratio": ours / baseline,
            "target": TARGET,
            "notes": (
                f"512 units 7x7 -> 112x112, {len(label_categories()) - 1} labels, "
                f"{firing:.0%} of pairs fire; ours: {BLOCK}-unit blocks through the stored "
                f"decoded labels (decoding included), {IMAGES} images; CPU time; baseline "
                f"(NetDissect-Lite loop with PIL) on {CHUNK} images, extrapolated; medians of "
                f"{ROUNDS} alternating rounds (ours {_rates(ours_rates)}, baseline "
                f"{_rates(baseline_rates)} images/s); identical counts asserted; Broden "
                f"projection, one core: ours {BRODEN_IMAGES / ours / 60:.2f} min, baseline "
                f"{BRODEN_IMAGES / baseline / 60:.0f} min; one block task ({BLOCK} units, "
                f"thresholds and tally) peaks at {peak:.0f} MiB"
            ),
        }
    ]


def _rates(rates: list[float]) -> str:
    return "/".join(f"{r:.0f}" for r in rates)


if __name__ == "__main__":
    for record in run():
        print(record)
