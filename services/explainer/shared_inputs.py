"""The read-only inputs one Explain call shares among its block tasks.

Each input is loaded from the store (or derived) at most once per call and put into
Ray once (`ray.put`), so the tasks on a node map one shared copy instead of each
reading it: the concept table, the layer's pooled activations, the probe set's
label matrix, the persisted train/val/test split, CLIP similarities of stored
embeddings and their sigmoid calibrated on the labels. Method-specific inputs are
made by the method (`ExplainMethod.prepare`) and cached here under its own name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from neurodissect.v1 import explainer_pb2

from services.common import keys
from services.common.activations import read_pooled
from services.common.errors import FailedPrecondition
from services.common.probe_format import ConceptTable, LabelChunk, read_label_chunk
from services.common.store import ObjectStore
from services.explainer import clip_dissect, linear
from services.explainer.explain_plan import ExplainPlan, read_table


def text_embeddings(
    store: ObjectStore, embeddings: explainer_pb2.ConceptEmbeddings
) -> tuple[list[str], np.ndarray]:
    """Concept names (C,) and their (C, D) float32 text embeddings, as the extractor stored them."""
    arrays = store.get_arrays(embeddings.text_key)
    return [str(n) for n in arrays["names"]], arrays["embeddings"].astype(np.float32)


def read_or_create_split(
    store: ObjectStore, dataset_key: str, n_images: int, seed: int
) -> linear.ImageSplit:
    """The dataset's persisted 70/10/20 split, created with `seed` if none is stored yet.

    One split per dataset serves every job, so that simulation scores LE on images it
    was never fitted on; a later request with another seed gets the stored split
    (its `seed` tells which).
    """
    key = keys.split(dataset_key)
    if store.exists(key):
        split = linear.ImageSplit.from_json(store.get_json(key))
        if sum(len(part) for part in (split.train, split.val, split.test)) != n_images:
            raise FailedPrecondition(
                f"the stored split {key!r} does not cover the {n_images} probe images",
                "dataset_key",
            )
    else:
        # Deterministic in (seed, N): concurrent creators write the same object.
        split = linear.split_images(n_images, seed)
        store.put_json(key, split.to_json())
    return split


@dataclass
class SharedInputs:
    """Inputs of one Explain call, each loaded once and `ray.put` at most once."""

    store: ObjectStore
    plan: ExplainPlan
    _values: dict[str, Any] = field(default_factory=dict)
    _refs: dict[str, ray.ObjectRef] = field(default_factory=dict)

    def value(self, name: str, load: Callable[[], Any]) -> Any:
        """Input `name`, loaded on first use."""
        if name not in self._values:
            self._values[name] = load()
        return self._values[name]

    def ref(self, name: str, load: Callable[[], Any]) -> ray.ObjectRef:
        """The object ref of input `name`, put into Ray on first use."""
        if name not in self._refs:
            self._refs[name] = ray.put(self.value(name, load))
        return self._refs[name]

    def table(self) -> ConceptTable:
        """The probe set's concept table."""
        return self.value("table", lambda: read_table(self.store, self.plan.dataset_key))

    def table_ref(self) -> ray.ObjectRef:
        """The concept table, shared."""
        return self.ref("table", self.table)

    def pooled(self, kind: str) -> np.ndarray:
        """(N, U) float32 spatial `kind` ("mean" | "max") of every unit of the layer."""

        def load() -> np.ndarray:
            mean, peak = read_pooled(self.store, self.plan.acts_key, self.plan.layer)
            return mean if kind == "mean" else peak

        return self.value(f"pooled_{kind}", load)

    def pooled_ref(self, kind: str) -> ray.ObjectRef:
        """The pooled activations, shared."""
        return self.ref(f"pooled_{kind}", lambda: self.pooled(kind))

    def label_chunks(self) -> Iterator[LabelChunk]:
        """Every stored label chunk of the probe set, in image order (one in memory at a time)."""
        for i0, i1 in self.table().chunk_ranges():
            yield read_label_chunk(self.store, self.plan.dataset_key, i0, i1)

    def label_matrix(self) -> np.ndarray:
        """(N, L) float32 presence of every label of the table in every image (LE(Label)).

        Column l is label `table.labels[l]`: 1 when it is an image-level label of the
        image or covers any of its pixels.
        """

        def load() -> np.ndarray:
            table = self.table()
            numbers = [c.number for c in table.labels]
            return linear.label_matrix(self.label_chunks(), table.n_images, numbers)

        return self.value("label_matrix", load)

    def split(self, seed: int) -> linear.ImageSplit:
        """The dataset's persisted train/val/test split (created on first use)."""
        return self.value(
            "split",
            lambda: read_or_create_split(
                self.store, self.plan.dataset_key, self.plan.manifest.n_images, seed
            ),
        )

    def clip_similarity(
        self, embeddings: explainer_pb2.ConceptEmbeddings
    ) -> tuple[list[str], np.ndarray]:
        """Concept names (C,) and the (N, C) float32 CLIP cosines S of stored embeddings."""
        names, texts = text_embeddings(self.store, embeddings)
        images = self.store.get_array(embeddings.image_key)
        return names, clip_dissect.clip_similarity(images, texts)

    def calibrate(self, names: list[str], similarity: np.ndarray) -> tuple[float, float] | None:
        """(a, b) of σ(a·(S + b)) fitted to the labels named like concepts; None if none is."""
        column = {c.name: i for i, c in enumerate(self.table().labels)}
        shared = [(m, column[n]) for m, n in enumerate(names) if n in column]
        if not shared:
            return None
        concept_at, label_at = (list(t) for t in zip(*shared, strict=True))
        return linear.calibrate_sigmoid(
            similarity[:, concept_at], self.label_matrix()[:, label_at]
        )
