"""Streaming extraction: one pass of a model over a probe dataset into the object store.

What one pass stores (keys in services.common.keys):
- per requested layer: activations (N, U, h, w) as unit-block × image-range chunks in
  float16 (or float32), a pooled chunk (per-image spatial mean and max, (n, U) float32)
  per image range, then the whole layer's pooled.npz ("mean", "max": (N, U) float32)
  and last the manifest (services.common.activations);
- the probe dataset's label maps per image range (probe_format.LabelChunk), then its
  concept table last;
- per requested CLIP model: image embeddings (N, D) float32, L2-normalised.

Images are decoded and resized by loader threads ahead of the forward pass; forward hooks
hand each layer's output to per-chunk buffers; full chunks go to a `ChunkWriter` whose
bounded queue lets uploads overlap the next batches while bounding memory.

Caching: keys are content hashes. The dataset key covers the index files, the selection
and the chunk size; the acts key covers the model identity (weights sha256), the
preprocessing, the requested input size, the dataset key, the dtype and the chunking.
A layer whose manifest exists is not recomputed; when every layer, the labels and the
embeddings exist, nothing is loaded and no forward pass runs (`cached=True`).

Image files are taken as immutable: the dataset key hashes the index files and the
selection, not every image.

Resume: an image range whose pooled chunk exists is complete for that layer (the pooled
chunk is written after its unit blocks). A restarted extraction skips the forward pass
for ranges complete in every layer still pending; CLIP embeddings, stored as one object,
are recomputed whole when missing.

Sharding (several extractor replicas on one job): an `index_only` pass builds the
concept table and label chunks (no model, no forward pass), which fixes the probe
indices; then each replica runs the job with its `Shard`, forwarding only the image
ranges whose chunk number is its index modulo the replica count and writing their
activation and pooled chunks under the same keys as an unsharded pass, finishing
nothing; last, an ordinary pass finds every range complete and only finishes (pooled.npz,
manifests, CLIP embeddings). Ranges are dealt round-robin rather than in contiguous
blocks so that replicas share the cost evenly where it varies along the index (an
ImageFolder sorted by class, image sizes by source) and a resumed job's remaining ranges
stay spread over all replicas.

Bad images: an image (or label PNG) that cannot be decoded is excluded, not zero-filled:
probe indices count readable images only, so labels, activations, pooled arrays and
embeddings stay aligned, and the concept table lists the readable images
(`image_names`) and the skipped ones (`bad_images`). Decoding is deterministic, so a
resumed pass assigns the same indices. More than `max_bad_fraction` of the selected
rows unreadable fails the extraction (FailedPrecondition naming the first bad files).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from services.common import keys
from services.common.activations import STORED_UNIT_BLOCK, ActivationManifest
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.metrics import BAD_IMAGES, IMAGES_EXTRACTED
from services.common.probe_format import (
    ConceptTable,
    LabelChunk,
    read_concepts,
    write_concepts,
    write_label_chunk,
)
from services.common.spec_vocabulary import (
    BATCH_SIZE,
    DEFAULT_ACTIVATION_DTYPE,
    IMAGE_CHUNK,
)
from services.common.store import ObjectStore
from services.extractor.clip_models import ClipEncoder, ClipSource
from services.extractor.hooks import (
    LayerTap,
    check_layers,
    layer_tap,
    prefix_tokens_of,
    unit_map,
)
from services.extractor.models import ModelSource, fixed_input_size
from services.extractor.preprocessing import Preprocessing, check_preprocessing, preprocessing
from services.extractor.probe_dataset import ProbeDataset, ProbeRow, UnreadableFile
from services.extractor.writer import ActivationChunk, ChunkWriter, write_activation_chunk

# Bumped when the stored activation layout changes, so old caches are not reused.
ACTS_VERSION = 1
ACTIVATION_DTYPES = {"float16": torch.float16, "float32": torch.float32}
FLOAT16_MAX = 65504.0
BAD_EXAMPLES = 10
PROGRESS_INTERVAL_S = 1.0
HEARTBEAT_S = 5.0
LOAD_GROUP = 8

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ComputeConfig:
    """How to run an extraction (ComputeSpec with defaults applied)."""

    device: str = "cpu"
    batch_size: int = BATCH_SIZE.default
    unit_block: int = STORED_UNIT_BLOCK  # units per stored chunk, not the explain blocks
    image_chunk: int = IMAGE_CHUNK.default
    dtype: str = DEFAULT_ACTIVATION_DTYPE
    loader_threads: int = 2
    writer_threads: int = 2
    max_pending_writes: int = 4

    def __post_init__(self) -> None:
        for name in ("batch_size", "unit_block", "image_chunk"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{getattr(self, name)} is not positive", f"compute.{name}")
        if self.dtype not in ACTIVATION_DTYPES:
            allowed = ", ".join(repr(d) for d in ACTIVATION_DTYPES)
            raise InvalidArgument(f"{self.dtype!r} is not allowed; use {allowed}",
                                  "compute.activation_dtype")


def compute_device(name: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` as a torch device; FailedPrecondition when it is absent."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidArgument(f"{name!r} is not a device; use cpu, cuda or cuda:N",
                              "compute.device") from None
    if device.type == "cuda":
        index = device.index or 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise FailedPrecondition(f"{name} is not available on this server", "compute.device")
    elif device.type != "cpu":
        raise InvalidArgument(f"{name!r} is not a device; use cpu, cuda or cuda:N",
                              "compute.device")
    return device


@dataclass(frozen=True)
class Shard:
    """The part of a job one of `count` replicas extracts: image ranges number ≡ `index`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise InvalidArgument(f"{self.count} is not positive", "shard_count")
        if not 0 <= self.index < self.count:
            raise InvalidArgument(f"{self.index} is outside [0, {self.count})", "shard_index")

    def owns(self, chunk_number: int) -> bool:
        """Whether the image range with this number (i0 // image_chunk) is this shard's."""
        return chunk_number % self.count == self.index


@dataclass
class Progress:
    """Where an extraction stands."""

    images_done: int
    images_total: int
    message: str


@dataclass
class ExtractionResult:
    """What an extraction stored; `cached` when nothing had to be computed."""

    dataset_key: str
    acts_keys: dict[str, str]
    image_embedding_keys: dict[str, str]
    n_images: int
    bad_images: int
    bad_image_examples: list[str]
    cached: bool
    # Images passed through the model in this run (0 when cached).
    images_forwarded: int = 0


@dataclass
class _Loaded:
    """One decoded row: model pixels, CLIP inputs and labels, or why it is unreadable."""

    row: ProbeRow
    index: int | None
    pixels: torch.Tensor | None = None  # (3, S, S) uint8
    clip_pixels: list[torch.Tensor] = field(default_factory=list)  # per CLIP: (3, s, s)
    labels: tuple[np.ndarray, np.ndarray] | None = None  # (P, sh, sw), (Q,) int32
    error: str = ""


@dataclass
class _LayerBuffer:
    """One layer's outputs on one image range, filled batch by batch.

    `acts` (image_chunk, U, h, w) in the stored dtype and `mean`, `max` (image_chunk, U)
    float32, all on the CPU and allocated once per range; the first `filled` rows are set.
    """

    acts: torch.Tensor
    mean: torch.Tensor
    max: torch.Tensor
    filled: int = 0


@dataclass
class _ChunkBuffers:
    """What one image range [i0, i0 + image_chunk) gathers before it is written.

    `layers`: the pending layers' buffers, created at their first batch; `labels`: per
    image, ((P, sh, sw), (Q,)) int32.
    """

    i0: int
    layers: dict[str, _LayerBuffer] = field(default_factory=dict)
    labels: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


@dataclass
class _PassState:
    """The state of one pass over the rows."""

    # Per pending layer: starts of the image ranges already stored.
    done: dict[str, set[int]]
    # Starts of the label ranges already stored; None when the labels are complete.
    labels_done: set[int] | None
    # Per pending CLIP model: (B, D) embeddings per batch.
    embeddings: list[list[np.ndarray]]
    bad: list[str]
    names: list[str] = field(default_factory=list)
    # Per layer, by range start: the (n, U) mean and max computed in this pass.
    pooled: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    batch: list[_Loaded] = field(default_factory=list)
    chunk: _ChunkBuffers | None = None


def _prefetched(
    fn: Callable[[T], R], items: Iterable[T], threads: int, depth: int
) -> Generator[R, None, None]:
    """`map(fn, items)` on `threads` threads, in order, at most `depth` results ahead."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probe-loader")
    pending: collections.deque[Future[R]] = collections.deque()
    source = iter(items)
    try:
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                break
        while pending:
            result = pending.popleft().result()
            for item in source:
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _heartbeat(
    work: Callable[[], R], message: str, total: int, done: int = 0
) -> Generator[Progress, None, R]:
    """Run `work` on a helper thread, yielding `message` now and every HEARTBEAT_S until done.

    Loading a toy model may mean training it for minutes: the progress messages keep the
    gRPC stream alive (and the user informed) meanwhile. They report `done` of `total`
    images, so a heartbeat after the images were read does not set progress back to 0.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract-setup")
    try:
        future = pool.submit(work)
        yield Progress(done, total, message)
        while True:
            try:
                return future.result(timeout=HEARTBEAT_S)
            except TimeoutError:
                yield Progress(done, total, message)
    finally:
        pool.shutdown(wait=False)


def _pooled_prefix(acts_key: str, layer: str) -> str:
    """The folder of a layer's pooled chunks (derived from the key layout)."""
    return keys.pooled_chunk(acts_key, layer, 0, 0).rsplit("/", 1)[0] + "/"


def acts_key_for(
    model_identity: str,
    preprocessing_name: str,
    input_size: int,
    dataset_key: str,
    compute: ComputeConfig,
) -> str:
    """The content key of a model's activations on a dataset (every layer lives under it)."""
    return keys.content_key(
        "acts",
        ACTS_VERSION,
        model_identity,
        preprocessing_name,
        input_size,
        dataset_key,
        compute.dtype,
        compute.unit_block,
        compute.image_chunk,
    )


class Extraction:
    """One extraction job: a model's layers (and CLIP embeddings) on one probe dataset.

    `run()` yields `Progress` while it works and an `ExtractionResult` last. The model
    is loaded only when some layer is not cached yet. `index_only`: only the concept
    table and label chunks; `shard`: only that shard's image ranges, no finishing (both
    store no CLIP embeddings, and a shard needs the concept table).
    """

    def __init__(
        self,
        store: ObjectStore,
        dataset: ProbeDataset,
        model: ModelSource,
        layers: list[str],
        compute: ComputeConfig,
        preprocessing_name: str = "",
        input_size: int = 0,
        clips: list[ClipSource] | None = None,
        max_bad_fraction: float = 0.01,
        shard: Shard | None = None,
        index_only: bool = False,
    ) -> None:
        if index_only and shard is not None:
            raise InvalidArgument("an index_only call is not sharded; set shard_count 0",
                                  "index_only")
        if not layers and not clips:
            raise InvalidArgument("at least one layer is required", field="layers")
        if len(set(layers)) != len(layers):
            raise InvalidArgument("a layer is listed twice", field="layers")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise InvalidArgument(f"{max_bad_fraction} is outside [0, 1]",
                                  "dataset.max_bad_fraction")
        self.store = store
        self.dataset = dataset
        self.model_source = model
        self.layers = list(layers)
        self.compute = compute
        self.preprocessing_name = preprocessing_name or model.default_preprocessing
        check_preprocessing(self.preprocessing_name)
        if input_size < 0:
            raise InvalidArgument(f"{input_size} is negative (0 = the dataset's image size)",
                                  "model.input_size")
        self.requested_size = input_size
        self.clips = list(clips or [])
        self.shard = shard
        self.index_only = index_only
        self.max_bad_fraction = max_bad_fraction
        self.device = compute_device(compute.device)
        self.dtype = ACTIVATION_DTYPES[compute.dtype]
        self.dataset_key = dataset.key(compute.image_chunk)
        self.acts_key = acts_key_for(
            model.identity, self.preprocessing_name, input_size, self.dataset_key, compute
        )
        # Set while running.
        self._prep: Preprocessing | None = None
        self._tap: LayerTap | None = None
        self._encoders: list[ClipEncoder] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dry_run = False
        self._active: set[str] = set()
        self._chunk: _ChunkBuffers | None = None
        self._prefix: int | None = None
        self.images_forwarded = 0

    # -- cache state -----------------------------------------------------------------------

    def _done_ranges(self, prefix: str) -> set[int]:
        """Start indices of the image ranges stored under `prefix` (i{i0}-{i1}.*)."""
        return {keys.parse_span(k)[0] for k in self.store.list(prefix)}

    def _result(
        self, table: ConceptTable, cached: bool, embeddings: dict[str, str]
    ) -> ExtractionResult:
        return ExtractionResult(
            dataset_key=self.dataset_key,
            acts_keys=dict.fromkeys(self.layers, self.acts_key),
            image_embedding_keys=embeddings,
            n_images=table.n_images,
            bad_images=len(table.bad_images),
            bad_image_examples=table.bad_images[:BAD_EXAMPLES],
            cached=cached,
            images_forwarded=self.images_forwarded,
        )

    # -- the pass --------------------------------------------------------------------------

    def run(self) -> Generator[Progress | ExtractionResult, None, None]:
        """Extract what is missing; yield progress, then the result."""
        store = self.store
        labels_done = store.exists(keys.concepts(self.dataset_key))
        pending = [] if self.index_only else [
            layer for layer in self.layers
            if not store.exists(keys.manifest(self.acts_key, layer))
        ]
        clips = [] if self.index_only or self.shard is not None else self.clips
        embedding_keys = {
            clip.label: keys.image_embeddings(self.dataset_key, clip.key) for clip in clips
        }
        pending_clips = [c for c in clips if not store.exists(embedding_keys[c.label])]
        table = read_concepts(store, self.dataset_key) if labels_done else None
        if table is None and self.shard is not None:
            raise FailedPrecondition(
                f"dataset {self.dataset_key} has no concept table yet: a sharded Extract "
                "needs an index_only Extract first", field="shard_count")
        done = {
            layer: self._done_ranges(_pooled_prefix(self.acts_key, layer)) for layer in pending
        }
        if table is not None and self.shard is not None and not self._known_rows(table, done):
            pending = []  # this shard's ranges are all stored: no model to load
        if table is not None and not pending and not pending_clips:
            total = self._images_of(table)
            yield Progress(total, total, "cached")
            yield self._result(table, True, embedding_keys)
            return
        total = len(self.dataset.rows) if table is None else self._images_of(table)
        if pending:
            message = f"loading {self.model_source.label}"
            yield from _heartbeat(lambda: self._prepare_model(pending), message, total)
        if pending_clips:
            self._encoders = yield from _heartbeat(
                lambda: [clip.load().to(self.device) for clip in pending_clips],
                "loading CLIP", total,
            )
        try:
            yield from self._stream(table, done, pending_clips, embedding_keys)
        finally:
            if self._tap is not None:
                self._tap.close()

    def _prepare_model(self, pending: list[str]) -> None:
        """Load the model, check the layers and learn their shapes from one dry run."""
        model = self.model_source.load().to(self.device)
        check_layers(model, pending, self.model_source.label)
        size = (
            self.requested_size
            or fixed_input_size(model)
            or self.dataset.image_size[0]
        )
        self._prep = preprocessing(self.preprocessing_name, size)
        self._prefix = prefix_tokens_of(model)
        self._tap = layer_tap(model, pending, self._on_output)
        self._dry_run = True
        try:
            dry = torch.zeros(1, 3, size, size, device=self.device)
            with torch.inference_mode():
                self._tap.calibrate(dry)
        except RuntimeError as exc:
            raise InvalidArgument(
                f"{self.model_source.label} fails on {size}×{size} inputs: {str(exc)[:300]}",
                field="model.input_size",
            ) from None
        finally:
            self._dry_run = False
        for layer in pending:
            if layer not in self._shapes:
                raise InvalidArgument(f"{layer!r} does not run in the forward pass", "layers")
            if not self._shapes[layer]:
                raise InvalidArgument(
                    f"{layer!r} does not output a feature map ((B, C, h, w), ViT tokens or "
                    "(B, C)); pick another module (DescribeModel lists the shapes)",
                    field="layers",
                )

    def _on_output(self, layer: str, output: Any) -> None:
        """Tap callback: copy a batch's (B, U, h, w) output and its pooled statistics.

        Passes over the output: max and mean per unit, the overall min (float16 only), and
        one copy that converts to the stored dtype straight into the range's CPU buffer
        (clamped to the float16 range only when a value lies outside it). `aminmax` along
        a dimension would be one pass fewer but runs an order of magnitude slower.
        """
        grid = unit_map(output, self._prefix)
        if self._dry_run:
            self._shapes[layer] = tuple(grid.shape[1:]) if grid is not None else ()
            return
        chunk = self._chunk
        if grid is None or chunk is None or layer not in self._active:
            return
        values = grid.float()
        high = values.amax(dim=(2, 3))
        mean = values.mean(dim=(2, 3))
        if self.dtype == torch.float16 and (
            float(high.max()) > FLOAT16_MAX or float(values.amin()) < -FLOAT16_MAX
        ):
            values = values.clamp(-FLOAT16_MAX, FLOAT16_MAX)
        buffer = chunk.layers.get(layer)
        if buffer is None:
            rows = (self.compute.image_chunk, *values.shape[1:])
            buffer = _LayerBuffer(
                acts=torch.empty(rows, dtype=self.dtype),
                mean=torch.empty(rows[:2], dtype=torch.float32),
                max=torch.empty(rows[:2], dtype=torch.float32),
            )
            chunk.layers[layer] = buffer
        rows_of = slice(buffer.filled, buffer.filled + values.shape[0])
        buffer.acts[rows_of].copy_(values)
        buffer.mean[rows_of].copy_(mean)
        buffer.max[rows_of].copy_(high)
        buffer.filled += values.shape[0]

    def _images_of(self, table: ConceptTable) -> int:
        """Images this pass covers: all of the table's, or its shard's ranges'."""
        return sum(
            i1 - i0 for number, (i0, i1) in enumerate(table.chunk_ranges())
            if self.shard is None or self.shard.owns(number)
        )

    def _stream(
        self,
        table: ConceptTable | None,
        done: dict[str, set[int]],
        pending_clips: list[ClipSource],
        embedding_keys: dict[str, str],
    ) -> Iterator[Progress | ExtractionResult]:
        """Decode rows, run batches, write full image ranges; then consolidate.

        `done`: per pending layer, the starts of its image ranges already stored.
        """
        pending = list(done)
        state = _PassState(
            done=done,
            labels_done=(
                self._done_ranges(keys.labels_prefix(self.dataset_key)) if table is None else None
            ),
            embeddings=[[] for _ in pending_clips],
            bad=list(table.bad_images) if table else [],
        )
        # Rows to decode; their index is known up front only when the table exists.
        if table is None:
            work: list[tuple[ProbeRow, int | None]] = [(r, None) for r in self.dataset.rows]
            total = len(self.dataset.rows)
        else:
            work = self._known_rows(table, state.done, bool(pending_clips))
            total = self._images_of(table)
        with_labels = table is None

        def load(group: list[tuple[ProbeRow, int | None]]) -> list[_Loaded]:
            return [self._load(row, index, with_labels) for row, index in group]

        # Rows are decoded in groups: one task per row would make the loader threads fight
        # the forward pass for the GIL on every image.
        groups = [work[i : i + LOAD_GROUP] for i in range(0, len(work), LOAD_GROUP)]
        depth = max(2, 2 * self.compute.batch_size // LOAD_GROUP)
        loader = _prefetched(load, groups, self.compute.loader_threads, depth)
        writer = ChunkWriter(self.compute.writer_threads, self.compute.max_pending_writes)
        last_progress = time.monotonic()
        try:
            for loaded in itertools.chain.from_iterable(loader):
                if loaded.error:
                    if table is not None:
                        raise FailedPrecondition(
                            f"{loaded.error}: it was readable when dataset {self.dataset_key} "
                            "was first extracted; the dataset changed", field="dataset.uri")
                    state.bad.append(loaded.row.name)
                    BAD_IMAGES.inc()
                    self._check_bad(state.bad, total)
                    continue
                index = loaded.index if loaded.index is not None else len(state.names)
                state.names.append(loaded.row.name)
                start = index - index % self.compute.image_chunk
                if state.chunk is not None and start != state.chunk.i0:
                    self._flush(state, pending, writer)
                if state.chunk is None:
                    state.chunk = _ChunkBuffers(start)
                state.batch.append(loaded)
                if len(state.batch) >= self.compute.batch_size:
                    self._run_batch(state, pending)
                if time.monotonic() - last_progress >= PROGRESS_INTERVAL_S:
                    last_progress = time.monotonic()
                    rows_done = len(state.names) + (
                        len(state.bad) if table is None else total - len(work))
                    yield Progress(rows_done, total, "extracting")
            if state.chunk is not None:
                self._flush(state, pending, writer)
        except BaseException:
            # Keep the first error; writes already queued still complete and stay valid.
            loader.close()
            with contextlib.suppress(Exception):
                writer.close()
            raise
        writer.close()
        if table is not None and self.shard is not None:
            yield Progress(total, total, "shard extracted")
            yield self._result(table, False, embedding_keys)
            return
        self._check_bad(state.bad, total)
        labels_pending = table is None
        complete = table or self.dataset.table(
            self.dataset_key, self.compute.image_chunk, state.names, state.bad
        )
        yield from _heartbeat(
            lambda: self._finish(
                complete, pending, pending_clips, state, embedding_keys, labels_pending
            ),
            "finishing", total, done=total,
        )
        yield self._result(complete, False, embedding_keys)

    def _run_batch(self, state: _PassState, pending: list[str]) -> None:
        """Forward the pending batch for the layers its range still lacks; embed; keep labels."""
        chunk, batch = state.chunk, state.batch
        if chunk is None or not batch:
            return
        self._chunk = chunk
        self._active = {layer for layer in pending if chunk.i0 not in state.done[layer]}
        if self._active:
            self._forward(batch)
        for k, (encoder, out) in enumerate(zip(self._encoders, state.embeddings, strict=True)):
            out.append(encoder.encode_images(torch.stack([b.clip_pixels[k] for b in batch])))
        if state.labels_done is not None and chunk.i0 not in state.labels_done:
            chunk.labels.extend(b.labels for b in batch if b.labels is not None)
        state.batch = []

    def _flush(self, state: _PassState, pending: list[str], writer: ChunkWriter) -> None:
        """Hand the finished image range's activations and labels to the writer."""
        self._run_batch(state, pending)
        chunk, store = state.chunk, self.store
        if chunk is None:
            return
        for layer, buffer in chunk.layers.items():
            n = buffer.filled
            piece = ActivationChunk(
                self.acts_key, layer, chunk.i0, buffer.acts[:n].numpy(),
                buffer.mean[:n].numpy(), buffer.max[:n].numpy(),
            )
            state.pooled.setdefault(layer, {})[chunk.i0] = (piece.mean, piece.max)
            writer.submit(functools.partial(
                write_activation_chunk, store, piece, self.compute.unit_block))
        if chunk.labels:
            labels = LabelChunk(
                chunk.i0,
                np.stack([pixel for pixel, _ in chunk.labels]),
                np.stack([image for _, image in chunk.labels]),
            )
            writer.submit(functools.partial(write_label_chunk, store, self.dataset_key, labels))
        state.chunk = self._chunk = None

    def _known_rows(
        self, table: ConceptTable, done: dict[str, set[int]], clips: bool = False
    ) -> list[tuple[ProbeRow, int | None]]:
        """Rows of the image ranges (of the shard, if any) that still need work, by index.

        Only when the concept table fixes the indices.
        """
        by_name = {row.name: row for row in self.dataset.rows}
        work: list[tuple[ProbeRow, int | None]] = []
        for number, (i0, i1) in enumerate(table.chunk_ranges()):
            if self.shard is not None and not self.shard.owns(number):
                continue
            if not clips and all(i0 in d for d in done.values()):
                continue
            for index in range(i0, i1):
                name = table.image_names[index]
                if name not in by_name:
                    raise FailedPrecondition(
                        f"image {name!r} of stored dataset {self.dataset_key} is no longer "
                        "in the index", field="dataset.uri")
                work.append((by_name[name], index))
        return work

    def _check_bad(self, bad: list[str], total: int) -> None:
        if len(bad) > self.max_bad_fraction * total:
            examples = ", ".join(bad[:BAD_EXAMPLES])
            raise FailedPrecondition(
                f"{len(bad)} of {total} images are unreadable, more than the tolerated "
                f"fraction {self.max_bad_fraction:g}; first: {examples}",
                field="dataset.max_bad_fraction",
            )

    def _load(self, row: ProbeRow, index: int | None, with_labels: bool) -> _Loaded:
        """Decode one row (runs on a loader thread)."""
        try:
            image = self.dataset.load_image(row)
            labels = self.dataset.load_labels(row) if with_labels else None
        except UnreadableFile as exc:
            return _Loaded(row, index, error=str(exc))
        pixels = self._prep.resize(image) if self._prep is not None else None
        clip_pixels = [encoder.preprocess(image) for encoder in self._encoders]
        return _Loaded(row, index, pixels, clip_pixels, labels)

    def _forward(self, batch: list[_Loaded]) -> None:
        """Run the model on a batch; the tap callback buffers the active layers' outputs."""
        assert self._tap is not None and self._prep is not None
        pixels = torch.stack([b.pixels for b in batch if b.pixels is not None])
        inputs = self._prep.normalize(pixels.to(self.device, non_blocking=True))
        try:
            with torch.inference_mode():
                self._tap(inputs)
        except torch.OutOfMemoryError:
            raise ResourceExhausted(
                f"out of memory on {self.device} at {len(batch)} images per batch; "
                "lower compute.batch_size", field="compute.batch_size"
            ) from None
        self.images_forwarded += len(batch)
        IMAGES_EXTRACTED.inc(len(batch))

    def _finish(
        self,
        table: ConceptTable,
        pending: list[str],
        pending_clips: list[ClipSource],
        state: _PassState,
        embedding_keys: dict[str, str],
        labels_pending: bool,
    ) -> None:
        """Write the consolidated objects, each kind's completion marker last.

        The concept table goes first (a manifest implies a complete dataset); then, in
        parallel, each CLIP model's embeddings and each layer's pooled.npz and manifest.
        """
        if labels_pending:
            write_concepts(self.store, table)
        tasks = len(pending) + len(pending_clips)
        writer = ChunkWriter(max(2, self.compute.writer_threads), max(1, tasks))
        try:
            for clip, parts in zip(pending_clips, state.embeddings, strict=True):
                writer.submit(functools.partial(
                    self.store.put_array, embedding_keys[clip.label], np.concatenate(parts)))
            for layer in pending:
                writer.submit(functools.partial(
                    self._finish_layer, table, layer, state.pooled.get(layer, {})))
        finally:
            writer.close()

    def _finish_layer(
        self,
        table: ConceptTable,
        layer: str,
        computed: dict[int, tuple[np.ndarray, np.ndarray]],
    ) -> None:
        """Store a layer's (N, U) pooled mean and max, then its manifest.

        `computed`: (n, U) mean and max of the ranges pooled in this pass, by range start;
        the other ranges' come from the store (an earlier, interrupted pass).
        """
        parts = []
        for i0, i1 in table.chunk_ranges():
            if i0 not in computed:
                stored = self.store.get_arrays(keys.pooled_chunk(self.acts_key, layer, i0, i1))
                computed[i0] = (stored["mean"], stored["max"])
            parts.append(computed[i0])
        self.store.put_arrays(
            keys.pooled(self.acts_key, layer),
            {
                "mean": np.concatenate([mean for mean, _ in parts]),
                "max": np.concatenate([peak for _, peak in parts]),
            },
        )
        units, height, width = self._shapes[layer]
        manifest = ActivationManifest(
            acts_key=self.acts_key,
            layer=layer,
            shape=(table.n_images, units, height, width),
            dtype=self.compute.dtype,
            unit_block=self.compute.unit_block,
            image_chunk=self.compute.image_chunk,
            dataset_key=self.dataset_key,
        )
        self.store.put_json(keys.manifest(self.acts_key, layer), manifest.to_json())
