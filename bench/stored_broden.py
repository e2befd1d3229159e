"""A Broden-like probe set and layer stored as a job stores them, and the explainer's path over it.

The synthetic labels and activations of `broden_like` (112×112 label maps, about
20 labels per image out of 1,241, a ResNet-18 layer4-like layer of 512 units at 7×7)
are written into a local object store in the extractor's layout: the concept table,
compressed label chunks of `IMAGE_CHUNK` images, float16 activation chunks of
`STORED_UNIT_BLOCK` units, the manifest. `explain_netdissect` then runs what an
Explain call runs for Network Dissection, in this process: the label chunks decoded
for the layer's grid (the Ray tasks of `NetDissect.prepare`), then `block_rows` of
every unit block (the block tasks), each reading the stored chunks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from neurodissect.v1 import common_pb2, explainer_pb2

from bench.broden_like import (
    CATEGORIES,
    FIRST,
    SIZES,
    synthetic_acts,
    synthetic_labels,
)
from services.common import keys
from services.common.activations import (
    STORED_UNIT_BLOCK,
    ActivationManifest,
    read_manifest,
    read_units,
)
from services.common.probe_format import (
    Concept,
    ConceptTable,
    LabelChunk,
    read_concepts,
    write_concepts,
    write_label_chunk,
)
from services.common.spec_vocabulary import IMAGE_CHUNK
from services.common.store import ObjectStore
from services.explainer import decoded_labels
from services.explainer.explain_plan import ExplainPlan, plan_request
from services.explainer.methods import EXPLAINER_METHODS
from services.explainer.methods.netdissect import NetDissect
from services.explainer.netdissect import IoUTally
from services.explainer.unit_masks import count_decoded

DATASET, ACTS, LAYER = "broden-like", "resnet18-like", "layer4"
CHUNK = IMAGE_CHUNK.default


@dataclass(frozen=True)
class StoredProbe:
    """What `write_probe` stored, and the activations it stored (float16 values as float32)."""

    n_images: int
    acts: np.ndarray  # (N, U, 7, 7) float32
    labels: list[LabelChunk]


def write_probe(store: ObjectStore, n_images: int) -> StoredProbe:
    """Store `n_images` Broden-like images and their layer as the extractor does."""
    table = ConceptTable(
        dataset_key=DATASET,
        categories=list(CATEGORIES),
        labels=[
            Concept(FIRST[cat] + k, f"{cat}-{k}", cat)
            for cat, size in SIZES.items()
            for k in range(size)
        ],
        n_images=n_images,
        image_size=(224, 224),
        mask_size=(112, 112),
        chunk_size=CHUNK,
        plane_categories=["object", "part", "color"],
    )
    write_concepts(store, table)
    chunks, parts = [], []
    for i0, i1 in table.chunk_ranges():
        generated = synthetic_labels(i0, i1 - i0)
        labels = LabelChunk(i0, generated.pixel, generated.image)
        write_label_chunk(store, DATASET, labels)
        acts = synthetic_acts(i0, labels).astype(np.float16)
        for u0 in range(0, acts.shape[1], STORED_UNIT_BLOCK):
            u1 = min(u0 + STORED_UNIT_BLOCK, acts.shape[1])
            store.put_array(keys.acts_chunk(ACTS, LAYER, u0, u1, i0, i1), acts[:, u0:u1])
        chunks.append(labels)
        parts.append(acts.astype(np.float32))
    acts = np.concatenate(parts)
    manifest = ActivationManifest(
        ACTS, LAYER, acts.shape, "float16", STORED_UNIT_BLOCK, CHUNK, DATASET  # type: ignore[arg-type]
    )
    store.put_json(keys.manifest(ACTS, LAYER), manifest.to_json())
    return StoredProbe(n_images, acts, chunks)


def netdissect_plan(store: ObjectStore, block: int, job: str = "bench") -> ExplainPlan:
    """The plan of an Explain call running Network Dissection in blocks of `block` units."""
    request = explainer_pb2.ExplainRequest(
        job_id=job,
        layer=LAYER,
        methods=["netdissect"],
        spec=common_pb2.DissectionSpec(
            netdissect=common_pb2.NetDissectParams(),
            compute=common_pb2.ComputeSpec(unit_block_size=block),
        ),
        dataset_key=DATASET,
        acts_key=ACTS,
    )
    return plan_request(store, request, EXPLAINER_METHODS)


def explain_netdissect(store: ObjectStore, plan: ExplainPlan) -> tuple[float, float]:
    """Run the plan's Network Dissection; CPU seconds of (decoding the labels, the blocks)."""
    method = NetDissect()
    params = method.params(plan.spec)
    table = read_concepts(store, DATASET)
    band_start = decoded_labels.grid_bands(table, plan.manifest.shape[2:])
    started = time.process_time()
    for i0, i1 in table.chunk_ranges():
        decoded_labels.decode_chunk(store, table, band_start, i0, i1)
    decoding = time.process_time() - started
    started = time.process_time()
    for u0, u1 in plan.blocks():
        method.block_rows(store, plan, params, u0, u1, table, band_start)
    return decoding, time.process_time() - started


def check_first_chunk(
    store: ObjectStore, thresholds: np.ndarray, reference: dict[str, np.ndarray]
) -> None:
    """Assert our tally of the first chunk from the stored decoded labels equals `reference`.

    `thresholds` (U,) of every unit, `reference` the counts of `baseline_tally` there.
    """
    table = read_concepts(store, DATASET)
    manifest = read_manifest(store, ACTS, LAYER)
    band_start = decoded_labels.grid_bands(table, manifest.shape[2:])
    i0, i1 = table.chunk_ranges()[0]
    labels = decoded_labels.read_decoded(store, table, band_start, i0, i1)
    tally = IoUTally(thresholds, table.label_categories(), len(table.categories))
    tally.add(count_decoded(read_units(store, manifest, 0, manifest.n_units, i0, i1), labels,
                            thresholds))
    counts = tally.result()
    for name, value in reference.items():
        if not np.array_equal(getattr(counts, name), value):
            raise AssertionError(f"tally differs from the reference in {name}")
