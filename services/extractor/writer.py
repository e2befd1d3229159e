"""Writing extracted chunks to the object store from background threads.

`ChunkWriter` runs store writes on worker threads fed through a bounded queue: the
forward pass of the next batch overlaps the upload of the previous chunk, and when the
store is slower than the model, `submit` blocks, so memory stays bounded by
`max_pending` chunks whatever the dataset size.

`write_activation_chunk` stores one layer's activations for one image range as
unit-block objects (`keys.acts_chunk`), then the range's pooled mean and max
(`keys.pooled_chunk`). The pooled chunk is written last: its presence marks the image
range complete for that layer, which is what a resumed extraction checks.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from services.common import keys
from services.common.store import ObjectStore

Task = Callable[[], None]


@dataclass
class ActivationChunk:
    """One layer's outputs on images [i0, i0 + n).

    `acts` (n, U, h, w) in the stored dtype; `mean` and `max` (n, U) float32 spatial
    mean and max per image and unit, computed before any down-casting.
    """

    acts_key: str
    layer: str
    i0: int
    acts: np.ndarray
    mean: np.ndarray
    max: np.ndarray

    @property
    def i1(self) -> int:
        """One past the chunk's last image."""
        return self.i0 + len(self.acts)


def write_activation_chunk(store: ObjectStore, chunk: ActivationChunk, unit_block: int) -> None:
    """Store a chunk as blocks of `unit_block` units, then its pooled summary (the marker)."""
    units = chunk.acts.shape[1]
    for u0 in range(0, units, unit_block):
        u1 = min(u0 + unit_block, units)
        key = keys.acts_chunk(chunk.acts_key, chunk.layer, u0, u1, chunk.i0, chunk.i1)
        store.put_array(key, np.ascontiguousarray(chunk.acts[:, u0:u1]))
    store.put_arrays(
        keys.pooled_chunk(chunk.acts_key, chunk.layer, chunk.i0, chunk.i1),
        {"mean": chunk.mean, "max": chunk.max},
    )


class ChunkWriter:
    """Worker threads running write tasks in submission order per worker.

    The first failing task's exception is re-raised by the next `submit` or by `close`;
    tasks after a failure are dropped.
    """

    def __init__(self, workers: int = 2, max_pending: int = 4) -> None:
        self._queue: queue.Queue[Task | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._work, name=f"chunk-writer-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            task = self._queue.get()
            try:
                if task is None:
                    return
                if self._error is None:
                    task()
            except BaseException as exc:
                self._error = self._error or exc
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, task: Task) -> None:
        """Queue a write, blocking while `max_pending` writes are waiting."""
        while True:
            self._raise_error()
            try:
                self._queue.put(task, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Finish every queued write, stop the workers and raise the first write error."""
        if self._threads:
            for _ in self._threads:
                self._queue.put(None)
            for thread in self._threads:
                thread.join()
            self._threads = []
        self._raise_error()
