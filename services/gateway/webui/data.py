"""What the pages show, read from the object store with the gateway's own readers.

Jobs come from the `JobStore` and unit answers from `results.unit_results` (the code
behind GetJob and ListUnits), activations and label maps from their stored chunks,
image thumbnails from `keys.thumbnail` objects, which the extractor materializes.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import numpy as np
from neurodissect.v1 import common_pb2, extractor_pb2

from services.common import keys, result_store
from services.common.activations import ActivationManifest, read_manifest, read_units
from services.common.errors import NotFound
from services.common.probe_format import ConceptTable, LabelChunk, read_concepts, read_label_chunk
from services.common.spec_vocabulary import SCORING_METHOD
from services.common.store import ObjectStore
from services.gateway import results
from services.gateway.jobs import TERMINAL, JobStore

T = TypeVar("T")

# Materialize(request) -> stored thumbnail keys, in request order (the extractor's RPC).
Materialize = Callable[[extractor_pb2.MaterializeRequest], list[str]]

# Stored chunks (activations, label maps) kept in memory: a unit page reads the same
# few chunks for all its exemplars, and neighbouring units share them.
_CACHED_CHUNKS = 8


class Lru:
    """A small thread-safe least-recently-used cache."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        """The value under `key`, made by `load()` (outside the lock) when not kept."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]  # type: ignore[return-value]
        value = load()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


class JobReader:
    """Jobs, unit answers, unit maps, label maps and thumbnails of one object store.

    `materialize` asks the extractor for thumbnails that are not stored yet; without
    it (a static copy made from the store alone) such images are left out. `jobs` is
    the gateway's own job store when the reader runs inside it (it holds the jobs the
    gateway runs); without it, the jobs are loaded from the store.
    """

    def __init__(
        self, store: ObjectStore, materialize: Materialize | None = None,
        jobs: JobStore | None = None,
    ) -> None:
        self.store = store
        self.jobs = jobs if jobs is not None else JobStore(store)
        self.materialize = materialize
        self._chunks = Lru(_CACHED_CHUNKS)
        self._finished_units = Lru(16)

    def job(self, job_id: str) -> common_pb2.Job:
        """The stored job; NotFound if there is none."""
        return self.jobs.get(job_id)

    def list_jobs(self) -> list[common_pb2.Job]:
        """Every job, newest first."""
        return self.jobs.list()

    def store_key(self, job: common_pb2.Job, name: str) -> str:
        """The store key of a file of the job's stored static copy."""
        return keys.report(job.id, name)

    def units(self, job: common_pb2.Job, layer: str) -> list[common_pb2.UnitResult]:
        """Every stored answer for the units of `layer`, by unit (cached once the job ended)."""
        if job.state not in TERMINAL:
            return results.unit_results(self.store, job.id, layer)
        return self._finished_units.get(
            (job.id, layer), lambda: results.unit_results(self.store, job.id, layer)
        )

    def unit(self, job: common_pb2.Job, layer: str, unit: int) -> common_pb2.UnitResult:
        """Every stored answer for one unit; NotFound when there is none yet."""
        found = results.unit_results(self.store, job.id, layer, unit, unit + 1)
        if not found:
            raise NotFound(f"no results for unit {unit} of layer {layer!r} yet", "unit")
        return found[0]

    def simulation_sample(
        self, job: common_pb2.Job, layer: str, unit: int
    ) -> dict[str, np.ndarray] | None:
        """Simulation's scatter sample of one unit (`result_store.read_sample`), or None."""
        return result_store.read_sample(self.store, job.id, layer, SCORING_METHOD, unit)

    def concepts(self, job: common_pb2.Job) -> ConceptTable:
        """The concept table of the job's probe dataset."""
        return self._chunks.get(
            ("concepts", job.dataset_key), lambda: read_concepts(self.store, job.dataset_key)
        )

    def manifest(self, job: common_pb2.Job, layer: str) -> ActivationManifest:
        """The stored activations' manifest of one layer of the job."""
        acts_key = job.acts_keys[layer]
        return self._chunks.get(
            ("manifest", acts_key, layer), lambda: read_manifest(self.store, acts_key, layer)
        )

    def unit_maps(
        self, job: common_pb2.Job, layer: str, unit: int, image_ids: Sequence[int]
    ) -> dict[int, np.ndarray]:
        """Raw maps of one unit on some probe images: image id -> (h, w) float32."""
        manifest = self.manifest(job, layer)
        b0, b1 = next((b0, b1) for b0, b1 in manifest.unit_ranges() if b0 <= unit < b1)
        maps = {}
        for image_id in image_ids:
            i0, i1 = _chunk_of(manifest.image_ranges(), image_id)
            chunk = self._chunks.get(
                ("acts", manifest.acts_key, layer, b0, b1, i0, i1),
                functools.partial(read_units, self.store, manifest, b0, b1, i0, i1),
            )
            maps[image_id] = chunk[image_id - i0, unit - b0]
        return maps

    def labels(self, job: common_pb2.Job, image_ids: Sequence[int]) -> dict[int, LabelChunk]:
        """Label maps of some probe images: image id -> a one-image LabelChunk."""
        table = self.concepts(job)
        out = {}
        for image_id in image_ids:
            i0, i1 = _chunk_of(table.chunk_ranges(), image_id)
            chunk = self._chunks.get(
                ("labels", job.dataset_key, i0, i1),
                functools.partial(read_label_chunk, self.store, job.dataset_key, i0, i1),
            )
            k = image_id - i0
            out[image_id] = LabelChunk(i0=image_id, pixel=chunk.pixel[k], image=chunk.image[k])
        return out

    def thumbnails(
        self, job: common_pb2.Job, image_ids: Sequence[int], size: int
    ) -> dict[int, bytes]:
        """PNG thumbnails (longer side `size` px) of probe images, by id.

        Thumbnails not stored are materialized by the extractor when this reader can
        reach it; otherwise they are missing from the answer.
        """
        wanted = {i: keys.thumbnail(job.dataset_key, i, size) for i in image_ids}
        missing = [i for i, key in wanted.items() if not self.store.exists(key)]
        if missing and self.materialize is not None:
            stored = self.materialize(extractor_pb2.MaterializeRequest(
                dataset=job.spec.dataset, dataset_key=job.dataset_key,
                image_ids=missing, size=size,
            ))
            wanted.update(zip(missing, stored, strict=True))
            missing = []
        return {i: self.store.get(key) for i, key in wanted.items() if i not in missing}


def _chunk_of(ranges: Sequence[tuple[int, int]], image_id: int) -> tuple[int, int]:
    for i0, i1 in ranges:
        if i0 <= image_id < i1:
            return i0, i1
    raise NotFound(f"image {image_id} is not in the probe dataset", "image")
