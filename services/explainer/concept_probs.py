"""CLIP-Dissect's (N, C) concept matrix P̃ stored in image × concept pieces, for bounded memory.

(Soft-)WPMI reads P̃ = softmax over concepts of a·S, S the cosines of the probe
images' and the concepts' stored CLIP embeddings (`clip_dissect.prepare_concepts`).
At 50,000 images × 20,000 concepts it is 4 GB: no process holds it whole. Instead

1. `write_rows` computes it IMAGE_BLOCK images at a time (one task each: S of the
   block's rows, then P̃, row by row exactly as the whole matrix would have them) and
   stores it in pieces of IMAGE_BLOCK images × CONCEPT_BLOCK concepts;
2. `read_columns` gives one concept block over all images, which is what
   `clip_dissect.wpmi_rows` needs to compute those columns of every unit's L rows.

Pieces are float32, so that labels and scores are the dense path's bit for bit. float16
would halve the pieces: on bench_soft_wpmi's inputs its labels agreed on every unit, but
it moves the scores and may flip near-ties, which exact answers rule out. The
pieces live under a content key of the embeddings and the method (`probs_digest`),
shared by every layer and job with the same CLIP inputs; an image block is complete
when its last piece is stored (pieces are written in concept order).
"""

from __future__ import annotations

import numpy as np
from neurodissect.v1 import explainer_pb2

from services.common import keys
from services.common.store import ObjectStore
from services.explainer import clip_dissect

# Images per task that computes P̃ (S and P̃ of the block: 2 × 80 MB at 20,000 concepts).
IMAGE_BLOCK = 1024
# Concepts per task that computes L columns: a multiple of 64 (see `clip_dissect.wpmi_rows`).
CONCEPT_BLOCK = 512
PROBS_VERSION = 1


def probs_digest(embeddings: explainer_pb2.ConceptEmbeddings, method: str) -> str:
    """Content key of P̃: the stored image and text embeddings, the method (its a), the pieces."""
    return keys.content_key(
        "concept-probs",
        PROBS_VERSION,
        embeddings.image_key,
        embeddings.text_key,
        clip_dissect.check_method(method),
        IMAGE_BLOCK,
        CONCEPT_BLOCK,
    )


def blocks(n: int, size: int) -> list[tuple[int, int]]:
    """[0, n) cut into ranges of `size`."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def is_stored(store: ObjectStore, digest: str, n_concepts: int, i0: int, i1: int) -> bool:
    """Whether the pieces of images [i0, i1) are all stored (the last is written last)."""
    m0, m1 = blocks(n_concepts, CONCEPT_BLOCK)[-1]
    return store.exists(keys.concept_probs(digest, m0, m1, i0, i1))


def write_rows(
    store: ObjectStore,
    digest: str,
    method: str,
    images: np.ndarray,
    texts: np.ndarray,
    i0: int,
) -> None:
    """Store P̃ of images [i0, i0 + n): `images` (n, D) and `texts` (C, D) embeddings."""
    probs = clip_dissect.prepare_concepts(
        method, clip_dissect.clip_similarity(images, texts), overwrite=True
    )
    for m0, m1 in blocks(len(texts), CONCEPT_BLOCK):
        store.put_array(
            keys.concept_probs(digest, m0, m1, i0, i0 + len(images)), probs[:, m0:m1]
        )


def read_columns(store: ObjectStore, digest: str, n_images: int, m0: int, m1: int) -> np.ndarray:
    """(N, m1 - m0) float32 concepts [m0, m1) of P̃ over every image, from the stored pieces."""
    out = np.empty((n_images, m1 - m0), dtype=np.float32)
    for i0, i1 in blocks(n_images, IMAGE_BLOCK):
        out[i0:i1] = store.get_array(keys.concept_probs(digest, m0, m1, i0, i1))
    return out
