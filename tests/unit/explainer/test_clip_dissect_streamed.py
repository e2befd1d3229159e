"""CLIP-Dissect's streamed (soft-)WPMI through the store gives the dense computation's answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from neurodissect.v1 import common_pb2, explainer_pb2

from services.common import keys, result_store
from services.common.activations import ActivationManifest
from services.common.settings import Settings
from services.common.store import LocalStore
from services.explainer import clip_dissect, concept_probs, sharding
from services.explainer.explain_plan import plan_request
from services.explainer.methods import EXPLAINER_METHODS
from services.explainer.servicer import explain

# More images and concepts than one block of P̃ holds, so pieces meet along both axes.
N_IMAGES, N_UNITS, DIM, CHUNK = concept_probs.IMAGE_BLOCK + 76, 40, 16, 256
N_CONCEPTS = concept_probs.CONCEPT_BLOCK + 88


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.shutdown()  # a Ray left connected by another module would be reused
    sharding.connect(Settings(ray_num_cpus=2))
    yield
    ray.shutdown()


def _write_layer(store: LocalStore) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Pooled chunks, manifest and CLIP embeddings of a layer whose units follow concepts."""
    rng = np.random.default_rng(31)
    images = rng.standard_normal((N_IMAGES, DIM)).astype(np.float32)
    texts = rng.standard_normal((N_CONCEPTS, DIM)).astype(np.float32)
    names = [f"concept{m}" for m in range(N_CONCEPTS)]
    # unit u responds to concept 7u's cosine, plus noise
    cosines = clip_dissect.clip_similarity(images, texts)
    mean = cosines[:, 7 * np.arange(N_UNITS)] + rng.normal(0, 0.05, (N_IMAGES, N_UNITS))
    mean = mean.astype(np.float32)
    peak = mean + 0.5
    manifest = ActivationManifest(
        "acts", "conv", (N_IMAGES, N_UNITS, 1, 1), "float32", 64, CHUNK, "ds"
    )
    for i0, i1 in manifest.image_ranges():
        store.put_arrays(
            keys.pooled_chunk("acts", "conv", i0, i1), {"mean": mean[i0:i1], "max": peak[i0:i1]}
        )
    store.put_arrays(keys.pooled("acts", "conv"), {"mean": mean, "max": peak})
    store.put_json(keys.manifest("acts", "conv"), manifest.to_json())
    store.put_array(keys.image_embeddings("ds", "clip"), images)
    store.put_arrays(
        keys.text_embeddings("clip", "words"), {"names": np.array(names), "embeddings": texts}
    )
    return images, texts, mean, names


@pytest.mark.parametrize("similarity", ["soft_wpmi", "wpmi"])
def test_streamed_labels_and_scores_are_the_dense_ones(
    local_ray: None, tmp_path: Path, similarity: str
) -> None:
    store = LocalStore(tmp_path / "store")
    images, texts, mean, names = _write_layer(store)
    spec = common_pb2.DissectionSpec(compute=common_pb2.ComputeSpec(unit_block_size=16))
    spec.clip_dissect.similarity = similarity
    embeddings = explainer_pb2.ConceptEmbeddings(
        image_key=keys.image_embeddings("ds", "clip"),
        text_key=keys.text_embeddings("clip", "words"),
    )
    request = explainer_pb2.ExplainRequest(
        job_id="job", layer="conv", methods=["clip_dissect"], spec=spec, dataset_key="ds",
        acts_key="acts", clip_dissect=embeddings,
    )
    list(explain(Settings(store_url=store.url), store, plan_request(store, request,
                                                                    EXPLAINER_METHODS)))
    stored = result_store.read_rows(store, "job", "conv", "clip_dissect")

    # today's dense path: S and P̃ whole, every unit's rows over all images at once
    prepared = clip_dissect.prepare_concepts(similarity, clip_dissect.clip_similarity(images,
                                                                                      texts))
    rows = clip_dissect.unit_rows(similarity, mean, prepared)
    layer = clip_dissect.layer_similarity(similarity, rows)
    rank = clip_dissect.layer_ranking(similarity, rows, layer)
    dense = clip_dissect.describe_units(layer, names, rank=rank)
    assert [stored[d.unit]["label"] for d in dense] == [d.label for d in dense]
    assert [[c["concept"] for c in stored[d.unit]["top5"]] for d in dense] == [
        list(d.top_labels) for d in dense
    ]
    np.testing.assert_array_equal([stored[d.unit]["score"] for d in dense],
                                  [np.float32(d.score) for d in dense])
    digest = concept_probs.probs_digest(embeddings, similarity)
    assert store.list(f"embed/probs/{digest}/")  # P̃ went through the store in pieces
