"""Network Dissection's explain stage at Broden scale: the shipped path vs NetDissect-Lite's loop.

Input (`stored_broden`): 3,000 Broden-like images stored as a job stores them (112×112
label maps with about 20 labels each out of 1,241; 512 units at 7×7 as float16 chunks
of 64 units × 256 images).

Ours: what an Explain call runs for Network Dissection, in this process: the label
chunks decoded once for the 7×7 grid (`NetDissect.prepare`'s tasks), then every
64-unit block task (`NetDissect.block_rows`: exact thresholds in one pass over the float16 chunks,
the tally against the stored decoded labels, bests, tally part and rows stored).

Reference: NetDissect-Lite's tally loop (`broden_like.baseline_tally`: per image,
per unit, raw-max check, PIL bilinear resize, threshold, bincount per label), given our
thresholds and the label maps in memory, on the first `REFERENCE_IMAGES` images; its
counts must equal ours there. Its quantile step is not counted (that favours it).

Both are timed in CPU seconds of this process (the machine is shared) and projected
linearly to full Broden (63,305 images). The explainer runs its decode and block tasks
on Ray, one per core: ours is projected on this machine's 2 cores as its CPU time / 2;
NetDissect-Lite's loop runs in one process. The two sides alternate over `ROUNDS`
rounds; each figure is the median of its rounds.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np

from bench.broden_like import baseline_tally, label_categories
from bench.stored_broden import (
    CHUNK,
    check_first_chunk,
    explain_netdissect,
    netdissect_plan,
    write_probe,
)
from services.common.store import LocalStore
from services.explainer.netdissect import unit_thresholds

IMAGES = 3000
REFERENCE_IMAGES = CHUNK  # the first stored chunk
ROUNDS = 2
BRODEN_IMAGES = 63_305
CORES = 2
# The reference, 12.8 min projected for NetDissect-Lite, against <= 1 min for ours.
TARGET = 12.8


def run() -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as root:
        store = LocalStore(root)
        probe = write_probe(store, IMAGES)
        acts, first = probe.acts, probe.labels[0]
        thresholds = unit_thresholds(lambda: iter([acts]))
        ours_s, decode_s, reference_s = [], [], []
        for r in range(ROUNDS):
            started = time.process_time()
            reference = baseline_tally(
                acts[:REFERENCE_IMAGES], first, thresholds, label_categories()
            )
            reference_s.append((time.process_time() - started) / REFERENCE_IMAGES)
            decoding, blocks = explain_netdissect(store, netdissect_plan(store, 64, f"r{r}"))
            ours_s.append((decoding + blocks) / IMAGES)
            decode_s.append(decoding / IMAGES)
        check_first_chunk(store, thresholds, reference)
    firing = float((acts.max(axis=(2, 3)) > thresholds).mean())
    present = [
        set(np.unique(c.pixel[i]).tolist()) | set(c.image[i].tolist())
        for c in probe.labels
        for i in range(len(c.pixel))
    ]
    per_image = float(np.mean([len(p - {0}) for p in present]))
    in_use = len(set().union(*present) - {0})
    ours = statistics.median(ours_s) * BRODEN_IMAGES / 60 / CORES
    baseline = statistics.median(reference_s) * BRODEN_IMAGES / 60
    decode = statistics.median(decode_s) * BRODEN_IMAGES / 60 / CORES
    print(
        f"netdissect_broden: full Broden projected: ours {ours:.2f} min on {CORES} cores "
        f"(label decoding {decode:.2f} min of it), NetDissect-Lite loop {baseline:.1f} min"
    )
    return [
        {
            "name": "netdissect_broden",
            "ours": ours,
            "baseline": baseline,
            "unit": "min",
            "ratio": baseline / ours,
            "target": TARGET,
            "notes": (
                f"explain stage for {BRODEN_IMAGES} images projected from {IMAGES} "
                f"Broden-like images ({in_use} labels in use, {per_image:.1f} per image, "
                f"{firing:.0%} of (image, unit) pairs fire), 512 units 7x7 -> 112x112, "
                f"64-unit block tasks over stored chunks; CPU time, ours / {CORES} cores "
                f"({_rates(ours_s)} ms/image for all 512 units on one core, label decoding "
                f"{_rates(decode_s)} ms/image once per grid), reference one process on "
                f"{REFERENCE_IMAGES} images ({_rates(reference_s)} ms/image, its quantile "
                f"not counted); counts identical to the reference (asserted); target: <= 1 min "
                f"against the issue's 12.8 min"
            ),
        }
    ]


def _rates(seconds_per_image: list[float]) -> str:
    return "/".join(f"{1e3 * s:.2f}" for s in seconds_per_image)


if __name__ == "__main__":
    for record in run():
        print(record)
