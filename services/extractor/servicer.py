"""The Extractor gRPC servicer: request messages in, core calls, progress and keys out.

Extract: the gateway sends model, layers, dataset, compute and the CLIP models whose
image embeddings it needs; the stream's last message has `finished=True` with the
dataset key, one acts key per layer, `arch|weights_uri` -> image embedding key, the
bad image count and examples, and `cached` when nothing was computed. `index_only` and
`shard_index`/`shard_count` ask for one part of a sharded extraction (see
services.extractor.extraction). Two identical extractions (or the same shard twice) at
once run one after the other, so the second is a cache hit. A toy world
that is not generated yet is generated first, with its own progress messages, and
stops when the call is cancelled.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator

import grpc
import torch
from neurodissect.v1 import common_pb2, extractor_pb2, extractor_pb2_grpc

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.probe_format import ConceptTable, read_concepts
from services.common.settings import Settings
from services.common.spec_vocabulary import (
    BATCH_SIZE,
    DEFAULT_ACTIVATION_DTYPE,
    DEFAULT_OCCLUSION_FILL,
    IMAGE_CHUNK,
    MAX_BAD_FRACTION,
    MAX_REGIONS,
    MAX_SEED,
    NAME,
    OCCLUSION_FILLS,
)
from services.common.store import ObjectStore
from services.extractor.classifier_head import model_heads, store_classes
from services.extractor.clip_models import ClipEncoder, ClipSource, resolve_clip
from services.extractor.datasets import DatasetRequest, open_dataset, toy_world_generation
from services.extractor.extraction import (
    ComputeConfig,
    Extraction,
    ExtractionResult,
    Shard,
    compute_device,
)
from services.extractor.hooks import describe
from services.extractor.local_paths import local_path
from services.extractor.models import ModelSource, fixed_input_size, resolve_model
from services.extractor.occlusion import Occlusion, OcclusionConfig, OcclusionOutcome
from services.extractor.probe_dataset import ProbeDataset
from services.extractor.text_embeddings import check_texts, embed_texts, read_concept_set
from services.extractor.thumbnails import materialize

log = logging.getLogger(__name__)

TEXT_ENCODERS_KEPT = 2


def dataset_request(spec: common_pb2.DatasetSpec) -> DatasetRequest:
    """The dataset part of a request, as the core's plain dataclass."""
    return DatasetRequest(
        kind=spec.kind,
        uri=spec.uri,
        split=spec.split,
        limit=spec.limit,
        categories=tuple(spec.categories),
        toy_n_images=spec.toyworld.n_images,
        toy_image_size=spec.toyworld.image_size,
        toy_seed=spec.toyworld.seed,
    )


def compute_config(spec: common_pb2.ComputeSpec, settings: Settings) -> ComputeConfig:
    """ComputeSpec with defaults: the server's device, batch 32, chunks of 256 images.

    `unit_block_size` is the explainer's and captioner's block size: the stored
    chunks' units are extraction's own (`STORED_UNIT_BLOCK`), so a job that changes
    the block size reuses the stored activations.
    """
    return ComputeConfig(
        device=spec.device or settings.device,
        batch_size=BATCH_SIZE.value(spec.batch_size),
        image_chunk=IMAGE_CHUNK.value(spec.image_chunk_size),
        dtype=spec.activation_dtype or DEFAULT_ACTIVATION_DTYPE,
        loader_threads=min(4, settings.extractor_threads()),
    )


def shard_of(request: extractor_pb2.ExtractRequest) -> Shard | None:
    """The request's shard, or None for the whole job; errors name the field."""
    if not request.shard_count:
        if request.shard_index:
            raise InvalidArgument("a shard_index needs a shard_count", field="shard_count")
        return None
    return Shard(request.shard_index, request.shard_count)


def check_layer_names(layers: list[str]) -> None:
    """InvalidArgument for a layer name that is no module path or is repeated."""
    seen: set[str] = set()
    for i, name in enumerate(layers):
        if not NAME.match(name) or ".." in name:
            raise InvalidArgument(f"{name!r} is not a module path", field=f"layers[{i}]")
        if name in seen:
            raise InvalidArgument(f"{name!r} is listed twice", field=f"layers[{i}]")
        seen.add(name)


def occlusion_config(params: common_pb2.OcclusionParams) -> OcclusionConfig:
    """OcclusionParams with defaults (black, 2000 regions, seed 0); errors name the field."""
    if params.fill and params.fill not in OCCLUSION_FILLS:
        allowed = ", ".join(repr(f) for f in OCCLUSION_FILLS)
        raise InvalidArgument(f"{params.fill!r} is not allowed; use one of {allowed}",
                              "occlusion.fill")
    if not 0 <= params.max_regions <= MAX_REGIONS.high:
        raise InvalidArgument(f"{params.max_regions} is outside [0, {MAX_REGIONS.high}]",
                              "occlusion.max_regions")
    if not 0 <= params.seed <= MAX_SEED:
        raise InvalidArgument(f"{params.seed} is outside [0, {MAX_SEED}]", "occlusion.seed")
    fill = next((f for f in OCCLUSION_FILLS if f == params.fill), DEFAULT_OCCLUSION_FILL)
    return OcclusionConfig(fill, MAX_REGIONS.value(params.max_regions), params.seed)


class ExtractorServicer(extractor_pb2_grpc.ExtractorServicer):
    """Extract, DescribeModel, Materialize and EmbedText over one object store."""

    def __init__(self, settings: Settings, store: ObjectStore | None = None) -> None:
        self.settings = settings
        self.store = store if store is not None else settings.open_store()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Text encoders kept loaded between EmbedText calls (a job asks for several).
        self._text_encoders: OrderedDict[str, ClipEncoder] = OrderedDict()
        self._text_encoders_lock = threading.Lock()

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _text_encoder(self, clip: ClipSource) -> ClipEncoder:
        """The loaded CPU encoder of `clip`, the last TEXT_ENCODERS_KEPT kept in memory."""
        with self._text_encoders_lock:
            if clip.key in self._text_encoders:
                self._text_encoders.move_to_end(clip.key)
                return self._text_encoders[clip.key]
        encoder = clip.load()
        with self._text_encoders_lock:
            self._text_encoders[clip.key] = encoder
            while len(self._text_encoders) > TEXT_ENCODERS_KEPT:
                self._text_encoders.popitem(last=False)
        return encoder

    def _model(self, spec: common_pb2.ModelSpec) -> ModelSource:
        return resolve_model(
            spec.source, spec.name, spec.weights_uri, spec.num_classes, self.settings
        )

    def _clips(self, specs: list[common_pb2.ClipModelSpec]) -> list[ClipSource]:
        clips: dict[str, ClipSource] = {}
        for i, spec in enumerate(specs):
            clip = resolve_clip(spec.arch, spec.weights_uri, self.settings, f"clip_models[{i}]")
            clips.setdefault(clip.label, clip)
        return list(clips.values())

    # -- Extract ---------------------------------------------------------------------------

    def Extract(  # noqa: N802
        self, request: extractor_pb2.ExtractRequest, context: grpc.ServicerContext
    ) -> Iterator[extractor_pb2.ExtractProgress]:
        """Stream progress of an extraction; the last message has finished=True."""
        layers = list(request.layers)
        check_layer_names(layers)
        compute = compute_config(request.compute, self.settings)
        wanted = dataset_request(request.dataset)
        if wanted.kind == "toyworld":
            # Generation stops at its next image when the call ends (a cancelled job).
            stop = threading.Event()
            context.add_callback(stop.set)
            for step in toy_world_generation(wanted, self.settings, stop):
                yield extractor_pb2.ExtractProgress(
                    images_done=step.done, images_total=step.total,
                    message="generating the toy world",
                )
        dataset = open_dataset(wanted, self.settings)
        max_bad = (
            request.dataset.max_bad_fraction
            if request.dataset.HasField("max_bad_fraction")
            else MAX_BAD_FRACTION.default
        )
        extraction = Extraction(
            self.store,
            dataset,
            self._model(request.model),
            layers,
            compute,
            preprocessing_name=request.model.preprocessing,
            input_size=request.model.input_size,
            clips=self._clips(list(request.clip_models)),
            max_bad_fraction=max_bad,
            shard=shard_of(request),
            index_only=request.index_only,
        )
        part = f"shard {request.shard_index}/{request.shard_count}" if request.shard_count else ""
        log.info("job %s: extract %s %s into %s %s", request.job_id,
                 extraction.model_source.label, layers, extraction.acts_key,
                 part or ("(index only)" if request.index_only else ""))
        # The same part of one extraction twice at once runs one after the other (the
        # second is then a cache hit); different shards run side by side.
        with self._lock(f"{extraction.dataset_key}/{extraction.acts_key}/{part}"):
            events = extraction.run()
            try:
                for event in events:
                    if isinstance(event, ExtractionResult):
                        yield _final_message(event)
                    else:
                        yield extractor_pb2.ExtractProgress(
                            images_done=event.images_done,
                            images_total=event.images_total,
                            message=event.message,
                        )
            finally:
                events.close()

    # -- Occlude -----------------------------------------------------------------------------

    def Occlude(  # noqa: N802
        self, request: extractor_pb2.OccludeRequest, context: grpc.ServicerContext
    ) -> Iterator[extractor_pb2.OccludeProgress]:
        """Stream progress of an occlusion run; the last message has finished=True."""
        layers = list(request.layers)
        check_layer_names(layers)
        config = occlusion_config(request.params)
        dataset = open_dataset(dataset_request(request.dataset), self.settings)
        occlusion = Occlusion(
            self.store, dataset, self._model(request.model), layers,
            compute_config(request.compute, self.settings), config,
            preprocessing_name=request.model.preprocessing, input_size=request.model.input_size,
        )
        log.info("job %s: occlude %s %s (%s fill, %d regions)", request.job_id,
                 occlusion.model_source.label, layers, config.fill, config.max_regions)
        with self._lock(f"occlusion/{occlusion.key}"):
            events = occlusion.run()
            try:
                for event in events:
                    if isinstance(event, OcclusionOutcome):
                        yield extractor_pb2.OccludeProgress(
                            finished=True, occlusion_keys=event.keys, cached=event.cached,
                            message="cached" if event.cached else "done",
                        )
                    else:
                        yield extractor_pb2.OccludeProgress(
                            regions_done=event.done, regions_total=event.total,
                            message=event.message,
                        )
            finally:
                events.close()

    # -- ClassifierHead ----------------------------------------------------------------------

    def ClassifierHead(  # noqa: N802
        self, request: extractor_pb2.ClassifierHeadRequest, context: grpc.ServicerContext
    ) -> extractor_pb2.ClassifierHeadResponse:
        """Store each layer's classifier head (or say why none) and the probe images' classes."""
        layers = list(request.layers)
        check_layer_names(layers)
        dataset = open_dataset(dataset_request(request.dataset), self.settings)
        compute = compute_config(request.compute, self.settings)
        table = self._stored_table(dataset.key(compute.image_chunk), dataset)
        heads = model_heads(
            self.store, self._model(request.model), layers,
            request.model.input_size, dataset.image_size[0],
        )
        labels_path = (
            local_path(request.labels_uri, "ablation.labels_uri", self.settings)
            if request.labels_uri else None
        )
        # Without any head there is nothing to score and no need for classes.
        labels_key = (
            store_classes(self.store, table, labels_path, heads.classes)
            if heads.head_keys else ""
        )
        return extractor_pb2.ClassifierHeadResponse(
            head_keys=heads.head_keys, notes=heads.notes, labels_key=labels_key,
            classes=heads.classes,
        )

    # -- DescribeModel ---------------------------------------------------------------------

    def DescribeModel(  # noqa: N802
        self, request: common_pb2.DescribeModelRequest, context: grpc.ServicerContext
    ) -> common_pb2.DescribeModelResponse:
        """Every named module of the model with its stored and raw output shapes."""
        source = self._model(request.model)
        model = source.load_for_shapes()
        size = request.model.input_size or fixed_input_size(model) or source.default_input_size
        if size < 1:
            raise InvalidArgument(f"{size} is not a positive size", field="model.input_size")
        device = compute_device(self.settings.device)
        try:
            shapes = describe(model.to(device), torch.zeros(1, 3, size, size, device=device))
        except RuntimeError as exc:
            raise InvalidArgument(
                f"{source.label} fails on {size}×{size} inputs: {str(exc)[:300]}",
                field="model.input_size",
            ) from None
        return common_pb2.DescribeModelResponse(
            layers=[
                common_pb2.LayerInfo(
                    name=s.name,
                    shape=list(s.shape),
                    module_type=s.module_type,
                    raw_shape=list(s.raw_shape),
                )
                for s in shapes
            ],
            input_size=size,
        )

    # -- Materialize -----------------------------------------------------------------------

    def _stored_table(self, dataset_key: str, dataset: ProbeDataset | None = None) -> ConceptTable:
        """The concept table stored under `dataset_key`, checked against `dataset` if given."""
        try:
            table = read_concepts(self.store, dataset_key)
        except NotFound:
            raise FailedPrecondition(
                f"no stored dataset {dataset_key!r}: run Extract on it first", field="dataset_key"
            ) from None
        if dataset is not None and dataset.key(table.chunk_size) != dataset_key:
            raise InvalidArgument(
                f"the dataset given is not the one stored as {dataset_key!r}", field="dataset"
            )
        return table

    def Materialize(  # noqa: N802
        self, request: extractor_pb2.MaterializeRequest, context: grpc.ServicerContext
    ) -> extractor_pb2.MaterializeResponse:
        """Store PNG thumbnails of probe images; keys in the order of `image_ids`.

        `dataset_key` defaults to the key of `dataset` extracted with the default chunking.
        """
        if not request.HasField("dataset"):
            raise InvalidArgument("the probe dataset is required", field="dataset")
        dataset = open_dataset(dataset_request(request.dataset), self.settings)
        table = self._stored_table(request.dataset_key or dataset.key(IMAGE_CHUNK.default), dataset)
        keys = materialize(self.store, dataset, table, list(request.image_ids), request.size)
        return extractor_pb2.MaterializeResponse(keys=keys)

    # -- EmbedText -------------------------------------------------------------------------

    def EmbedText(  # noqa: N802
        self, request: extractor_pb2.EmbedTextRequest, context: grpc.ServicerContext
    ) -> extractor_pb2.EmbedTextResponse:
        """Embed texts, a concept set file or a dataset's label names; return the key."""
        clip = resolve_clip(request.clip.arch, request.clip.weights_uri, self.settings, "clip")
        if request.texts:
            names = list(request.texts)
            check_texts(names)
        elif request.concept_set_uri:
            path = local_path(request.concept_set_uri, "concept_set_uri", self.settings)
            names = read_concept_set(path)
            check_texts(names, "concept_set_uri")
        elif request.dataset_key:
            table = self._stored_table(request.dataset_key)
            names = [concept.name for concept in table.labels]
        else:
            raise InvalidArgument(
                "give texts, a concept_set_uri or the dataset_key whose labels to embed",
                field="texts",
            )
        key = embed_texts(self.store, clip, names, self._text_encoder)
        return extractor_pb2.EmbedTextResponse(key=key, count=len(names))


def _final_message(result: ExtractionResult) -> extractor_pb2.ExtractProgress:
    return extractor_pb2.ExtractProgress(
        images_done=result.n_images,
        images_total=result.n_images,
        message="cached" if result.cached else "done",
        finished=True,
        dataset_key=result.dataset_key,
        acts_keys=result.acts_keys,
        image_embedding_keys=result.image_embedding_keys,
        bad_images=result.bad_images,
        bad_image_examples=result.bad_image_examples,
        cached=result.cached,
    )
