"""ChunkWriter: background writes, bounded queue, first error re-raised; chunk layout."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from services.common import keys
from services.common.store import LocalStore
from services.extractor.writer import ActivationChunk, ChunkWriter, write_activation_chunk


def test_writes_complete_and_submit_blocks_when_full() -> None:
    release = threading.Event()
    done: list[int] = []
    writer = ChunkWriter(workers=1, max_pending=1)

    def slow(i: int) -> None:
        release.wait(5)
        done.append(i)

    writer.submit(lambda: slow(0))  # taken by the worker, which then waits
    time.sleep(0.1)
    writer.submit(lambda: slow(1))  # fills the queue
    blocked = threading.Thread(target=writer.submit, args=(lambda: slow(2),))
    blocked.start()
    time.sleep(0.3)
    assert blocked.is_alive()  # bounded: the third write waits for room
    release.set()
    blocked.join(5)
    writer.close()
    assert done == [0, 1, 2]


def test_first_error_is_raised_and_later_tasks_dropped() -> None:
    ran: list[str] = []
    writer = ChunkWriter(workers=1, max_pending=4)

    def boom() -> None:
        raise OSError("disk full")

    writer.submit(boom)
    time.sleep(0.2)
    with pytest.raises(OSError, match=r"disk full"):
        writer.submit(lambda: ran.append("late"))
    with pytest.raises(OSError, match=r"disk full"):
        writer.close()
    assert ran == []


def test_activation_chunk_layout(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    acts = np.arange(3 * 7 * 2 * 2, dtype=np.float16).reshape(3, 7, 2, 2)
    mean = acts.astype(np.float32).mean(axis=(2, 3))
    peak = acts.astype(np.float32).max(axis=(2, 3))
    write_activation_chunk(store, ActivationChunk("k", "layer4", 10, acts, mean, peak), 3)
    names = store.list("acts/k/layer4/")
    assert names == sorted([
        keys.acts_chunk("k", "layer4", 0, 3, 10, 13),
        keys.acts_chunk("k", "layer4", 3, 6, 10, 13),
        keys.acts_chunk("k", "layer4", 6, 7, 10, 13),
        keys.pooled_chunk("k", "layer4", 10, 13),
    ])
    last = store.get_array(keys.acts_chunk("k", "layer4", 6, 7, 10, 13))
    np.testing.assert_array_equal(last, acts[:, 6:7])
    pooled = store.get_arrays(keys.pooled_chunk("k", "layer4", 10, 13))
    np.testing.assert_array_equal(pooled["max"], peak)
