"""The probe dataset as stored for the explainer and captioner (no raw images).

`concepts.json` holds a `ConceptTable`; label maps are stored per image range as
`.npz` with two arrays (a `LabelChunk`):

- `pixel`: (n, P, sh, sw) int32, P label planes at mask resolution. Each plane holds
  global label numbers, 0 = unlabeled. A Broden category cell with several PNG layers
  (parts) gives several planes; `ConceptTable.plane_categories[p]` names the category
  of plane p.
- `image`: (n, Q) int32, image-level labels (scene, texture, ImageFolder classes),
  padded with 0. An image-level label covers the whole image.

Label number 0 is never a concept. `ConceptTable.labels[i]` describes label number
`labels[i].number`; numbers need not be dense.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from services.common import keys
from services.common.store import ObjectStore


@dataclass(frozen=True)
class Concept:
    """One label of the probe dataset."""

    number: int
    name: str
    category: str  # primary category: the one with the largest coverage
    frequency: int = 0
    coverage: float = 0.0


@dataclass
class ConceptTable:
    """Concepts, categories and geometry of one stored probe dataset."""

    dataset_key: str
    categories: list[str]
    labels: list[Concept]
    n_images: int
    image_size: tuple[int, int]
    mask_size: tuple[int, int]
    chunk_size: int
    plane_categories: list[str]
    image_names: list[str] = field(default_factory=list)
    bad_images: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConceptTable:
        """Build from the dict written by `to_json`."""
        data = dict(data)
        data["labels"] = [Concept(**c) for c in data["labels"]]
        data["image_size"] = tuple(data["image_size"])
        data["mask_size"] = tuple(data["mask_size"])
        return cls(**data)

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """Image ranges [i0, i1) of the stored label chunks, in order."""
        return [
            (i0, min(i0 + self.chunk_size, self.n_images))
            for i0 in range(0, self.n_images, self.chunk_size)
        ]

    def max_label(self) -> int:
        """The largest label number (size of per-label count arrays minus one)."""
        return max((c.number for c in self.labels), default=0)

    def label_categories(self) -> np.ndarray:
        """Return (max_label + 1,) int32: each label's primary category index, -1 if none."""
        out = np.full(self.max_label() + 1, -1, dtype=np.int32)
        index = {name: i for i, name in enumerate(self.categories)}
        for concept in self.labels:
            out[concept.number] = index.get(concept.category, -1)
        return out

    def label_names(self) -> dict[int, str]:
        """Label number -> name."""
        return {c.number: c.name for c in self.labels}


@dataclass
class LabelChunk:
    """Label maps of images [i0, i1) at mask resolution."""

    i0: int
    pixel: np.ndarray  # (n, P, sh, sw) int32
    image: np.ndarray  # (n, Q) int32

    @property
    def i1(self) -> int:
        """One past the last image of the chunk."""
        return self.i0 + len(self.pixel)


def write_concepts(store: ObjectStore, table: ConceptTable) -> None:
    """Store the concept table of a probe dataset."""
    store.put_json(keys.concepts(table.dataset_key), table.to_json())


def read_concepts(store: ObjectStore, dataset_key: str) -> ConceptTable:
    """Load the concept table of a stored probe dataset."""
    return ConceptTable.from_json(store.get_json(keys.concepts(dataset_key)))


def write_label_chunk(store: ObjectStore, dataset_key: str, chunk: LabelChunk) -> None:
    """Store the label maps of one image range."""
    store.put_arrays(
        keys.labels(dataset_key, chunk.i0, chunk.i1),
        {"pixel": chunk.pixel.astype(np.int32), "image": chunk.image.astype(np.int32)},
        compress=True,
    )


def read_label_chunk(store: ObjectStore, dataset_key: str, i0: int, i1: int) -> LabelChunk:
    """Load the label maps of images [i0, i1)."""
    arrays = store.get_arrays(keys.labels(dataset_key, i0, i1))
    return LabelChunk(i0=i0, pixel=arrays["pixel"], image=arrays["image"])
