"""An ExplainRequest checked against the object store and resolved into an `ExplainPlan`.

Every check names the offending request field: INVALID_ARGUMENT for a value
outside what is allowed (unknown method, unit range outside the layer, bad
parameter), NOT_FOUND for stored inputs that do not exist (activations, concept
table, CLIP embeddings), FAILED_PRECONDITION for stored inputs that do not fit
together. Each method checks its own parameters and names the embeddings it needs
(`method_contract.ExplainMethod`); this module knows no method by name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neurodissect.v1 import common_pb2, explainer_pb2

from services.common.activations import (
    ActivationManifest,
    check_name,
    requested_manifest,
    requested_units,
)
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.probe_format import ConceptTable, read_concepts
from services.common.spec_vocabulary import UNIT_BLOCK
from services.common.store import ObjectStore
from services.explainer.sharding import unit_blocks

if TYPE_CHECKING:
    from services.explainer.method_contract import ExplainMethod

@dataclass(frozen=True)
class ExplainPlan:
    """What one Explain call does: a layer, its unit blocks, the methods and their inputs."""

    job_id: str
    layer: str
    methods: tuple[str, ...]
    dataset_key: str
    acts_key: str
    manifest: ActivationManifest
    unit_start: int
    unit_end: int
    block_size: int
    spec: common_pb2.DissectionSpec
    # The request's stored CLIP embeddings by field name (the method they serve).
    embeddings: Mapping[str, explainer_pb2.ConceptEmbeddings]
    # What the extractor stored for the verification methods (occlusion, ablation).
    occlusion_key: str = ""
    ablation: explainer_pb2.AblationInputs = dataclasses.field(
        default_factory=explainer_pb2.AblationInputs
    )

    @property
    def n_units(self) -> int:
        """Units of the whole layer."""
        return self.manifest.n_units

    def blocks(self) -> list[tuple[int, int]]:
        """The requested unit blocks [u0, u1)."""
        return unit_blocks(self.unit_start, self.unit_end, self.block_size)

    def layer_blocks(self) -> list[tuple[int, int]]:
        """Every unit block of the layer (for steps that must see all units)."""
        return unit_blocks(0, self.n_units, self.block_size)

    @property
    def units_total(self) -> int:
        """Number of requested units."""
        return self.unit_end - self.unit_start


def check_choice(value: str, allowed: Sequence[str], field: str) -> None:
    """Raise InvalidArgument naming `field` unless `value` is empty (the default) or allowed."""
    if value and value not in allowed:
        listed = ", ".join(repr(a) for a in allowed)
        raise InvalidArgument(
            f"{value!r} is not allowed; use one of {listed} (empty: the default)", field
        )


def check_open_unit(value: float, field: str) -> None:
    """Raise InvalidArgument naming `field` unless 0 < `value` < 1."""
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise InvalidArgument(f"{value} is not strictly between 0 and 1", field)


def _methods(
    request: explainer_pb2.ExplainRequest, known: Mapping[str, ExplainMethod]
) -> tuple[str, ...]:
    if not request.methods:
        raise InvalidArgument(f"name at least one method of {', '.join(known)}", "methods")
    seen: set[str] = set()
    for i, method in enumerate(request.methods):
        if method not in known:
            listed = ", ".join(repr(m) for m in known)
            raise InvalidArgument(
                f"unknown method {method!r}; use one of {listed}", f"methods[{i}]"
            )
        if method in seen:
            raise InvalidArgument(f"{method!r} is listed twice", f"methods[{i}]")
        seen.add(method)
    return tuple(m for m in known if m in seen)


def _embeddings(
    store: ObjectStore, embeddings: explainer_pb2.ConceptEmbeddings, field: str, why: str
) -> None:
    for name in ("image_key", "text_key"):
        key = getattr(embeddings, name)
        if not key:
            raise InvalidArgument(f"{why} needs the stored CLIP embeddings", f"{field}.{name}")
        if not store.exists(key):
            raise NotFound(f"no stored object {key!r}", f"{field}.{name}")


def plan_request(
    store: ObjectStore,
    request: explainer_pb2.ExplainRequest,
    known: Mapping[str, ExplainMethod],
) -> ExplainPlan:
    """Check `request` against the store and return its plan, or raise naming the field.

    `known` holds the explainer's methods by name, in running order.
    """
    job_id = check_name(request.job_id, "job_id")
    layer = check_name(request.layer, "layer")
    methods = _methods(request, known)
    dataset_key = check_name(request.dataset_key, "dataset_key")
    acts_key = check_name(request.acts_key, "acts_key")
    for method in methods:
        known[method].params(request.spec)
    block_size = request.spec.compute.unit_block_size or UNIT_BLOCK.default
    if not 1 <= block_size <= UNIT_BLOCK.high:
        raise InvalidArgument(
            f"{block_size} is outside [1, {UNIT_BLOCK.high}] (0 = {UNIT_BLOCK.default})",
            "spec.compute.unit_block_size",
        )
    manifest = requested_manifest(store, acts_key, layer, dataset_key)
    unit_start, unit_end = requested_units(request.unit_start, request.unit_end, manifest)
    plan = ExplainPlan(
        job_id=job_id,
        layer=layer,
        methods=methods,
        dataset_key=dataset_key,
        acts_key=acts_key,
        manifest=manifest,
        unit_start=unit_start,
        unit_end=unit_end,
        block_size=block_size,
        spec=request.spec,
        embeddings={
            field.name: getattr(request, field.name)
            for field in request.DESCRIPTOR.fields
            if field.message_type is explainer_pb2.ConceptEmbeddings.DESCRIPTOR
        },
        occlusion_key=request.occlusion_key,
        ablation=request.ablation,
    )
    for method in methods:
        for field, embeddings, why in known[method].embeddings(request):
            _embeddings(store, embeddings, field, why)
    if any(known[m].reads_labels for m in methods):
        table = read_table(store, dataset_key)
        if (table.n_images, table.chunk_size) != (manifest.n_images, manifest.image_chunk):
            raise FailedPrecondition(
                f"dataset {dataset_key!r} stores {table.n_images} images in chunks of"
                f" {table.chunk_size}, the activations {manifest.n_images} in chunks of"
                f" {manifest.image_chunk}; extract both with the same image_chunk_size",
                "dataset_key",
            )
    return plan


def read_table(store: ObjectStore, dataset_key: str) -> ConceptTable:
    """The probe set's concept table; NotFound naming `dataset_key` if it is not stored."""
    try:
        return read_concepts(store, dataset_key)
    except NotFound:
        raise NotFound(
            f"no stored concept table for dataset {dataset_key!r} (extract it first)",
            "dataset_key",
        ) from None
