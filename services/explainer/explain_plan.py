"""An ExplainRequest checked against the object store and resolved into an `ExplainPlan`.

Every check names the offending request field: INVALID_ARGUMENT for a value
outside what is allowed (unknown method, unit range outside the layer, bad
parameter), NOT_FOUND for stored inputs that do not exist (activations, concept
table, CLIP embeddings), FAILED_PRECONDITION for stored inputs that do not fit
together. Defaults of the method parameters are applied in `method_params`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from neurodissect.v1 import common_pb2, explainer_pb2

from services.common.activations import ActivationManifest, requested_manifest, requested_units
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.probe_format import ConceptTable, read_concepts
from services.common.store import ObjectStore
from services.explainer import clip_dissect, linear, netdissect
from services.explainer.sharding import DEFAULT_UNIT_BLOCK, unit_blocks

# Methods in the order they run: compositional reuses netdissect's thresholds,
# simulation scores what the others stored.
METHODS = ("netdissect", "compositional", "clip_dissect", "linear", "simulation")
POOLINGS = ("mean", "max")
LINEAR_CONCEPTS = ("label", "clip")
MAX_UNIT_BLOCK = 8192

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


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
    clip_dissect: explainer_pb2.ConceptEmbeddings
    linear: explainer_pb2.ConceptEmbeddings
    simulation: explainer_pb2.ConceptEmbeddings

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


def _name(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument("must not be empty", field)
    if not _NAME.match(value):
        raise InvalidArgument(
            f"{value!r} may hold only letters, digits, '_', '.' and '-' (at most 200)", field
        )
    return value


def _choice(value: str, allowed: Sequence[str], field: str) -> None:
    if value and value not in allowed:
        listed = ", ".join(repr(a) for a in allowed)
        raise InvalidArgument(
            f"{value!r} is not allowed; use one of {listed} (empty: the default)", field
        )


def _open_unit(spec_has: bool, value: float, field: str) -> None:
    if spec_has and not (math.isfinite(value) and 0.0 < value < 1.0):
        raise InvalidArgument(f"{value} is not strictly between 0 and 1", field)


def _methods(request: explainer_pb2.ExplainRequest) -> tuple[str, ...]:
    if not request.methods:
        raise InvalidArgument(f"name at least one method of {', '.join(METHODS)}", "methods")
    seen: set[str] = set()
    for i, method in enumerate(request.methods):
        if method not in METHODS:
            listed = ", ".join(repr(m) for m in METHODS)
            raise InvalidArgument(
                f"unknown method {method!r}; use one of {listed}", f"methods[{i}]"
            )
        if method in seen:
            raise InvalidArgument(f"{method!r} is listed twice", f"methods[{i}]")
        seen.add(method)
    return tuple(m for m in METHODS if m in seen)


def _params(spec: common_pb2.DissectionSpec) -> None:
    nd, comp, cd, lin = spec.netdissect, spec.compositional, spec.clip_dissect, spec.linear
    _open_unit(nd.HasField("top_quantile"), nd.top_quantile, "spec.netdissect.top_quantile")
    _choice(nd.iou_mode, netdissect.IOU_MODES, "spec.netdissect.iou_mode")
    if nd.exemplars < 0:
        raise InvalidArgument(f"{nd.exemplars} is negative", "spec.netdissect.exemplars")
    _open_unit(comp.HasField("top_quantile"), comp.top_quantile, "spec.compositional.top_quantile")
    for field in ("beam", "max_length", "top_k_primitives"):
        value = getattr(comp, field)
        if value < 0:
            raise InvalidArgument(f"{value} is negative", f"spec.compositional.{field}")
    _choice(cd.similarity, clip_dissect.METHODS, "spec.clip_dissect.similarity")
    _choice(cd.pooling, POOLINGS, "spec.clip_dissect.pooling")
    _choice(lin.concepts, LINEAR_CONCEPTS, "spec.linear.concepts")
    if lin.max_concepts not in (0, linear.MAX_CONCEPTS):
        raise InvalidArgument(
            f"{lin.max_concepts} is not supported; LE selects at most {linear.MAX_CONCEPTS}"
            " concepts (0 = the default)",
            "spec.linear.max_concepts",
        )


def _embeddings(
    store: ObjectStore, embeddings: explainer_pb2.ConceptEmbeddings, field: str, why: str
) -> None:
    for name in ("image_key", "text_key"):
        key = getattr(embeddings, name)
        if not key:
            raise InvalidArgument(f"{why} needs the stored CLIP embeddings", f"{field}.{name}")
        if not store.exists(key):
            raise NotFound(f"no stored object {key!r}", f"{field}.{name}")


def needs_concepts(plan: ExplainPlan) -> bool:
    """Tell whether the plan reads the probe set's labels (concept table and label maps).

    Every method but CLIP-Dissect does: LE(CLIP) and CLIP simulators calibrate on them.
    """
    return any(m != "clip_dissect" for m in plan.methods)


def plan_request(store: ObjectStore, request: explainer_pb2.ExplainRequest) -> ExplainPlan:
    """Check `request` against the store and return its plan, or raise naming the field."""
    job_id = _name(request.job_id, "job_id")
    layer = _name(request.layer, "layer")
    methods = _methods(request)
    dataset_key = _name(request.dataset_key, "dataset_key")
    acts_key = _name(request.acts_key, "acts_key")
    _params(request.spec)
    block_size = request.spec.compute.unit_block_size or DEFAULT_UNIT_BLOCK
    if not 1 <= block_size <= MAX_UNIT_BLOCK:
        raise InvalidArgument(
            f"{block_size} is outside [1, {MAX_UNIT_BLOCK}] (0 = {DEFAULT_UNIT_BLOCK})",
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
        clip_dissect=request.clip_dissect,
        linear=request.linear,
        simulation=request.simulation,
    )
    if "clip_dissect" in methods:
        _embeddings(store, request.clip_dissect, "clip_dissect", "CLIP-Dissect")
    if "linear" in methods and request.spec.linear.concepts == "clip":
        _embeddings(store, request.linear, "linear", "LE(CLIP)")
    if "simulation" in methods and (request.simulation.image_key or request.simulation.text_key):
        _embeddings(store, request.simulation, "simulation", "a CLIP simulator")
    if needs_concepts(plan):
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
