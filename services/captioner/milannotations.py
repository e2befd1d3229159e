"""Loader for MILANNOTATIONS-format data: units' exemplars and their human descriptions.

Directory layout, one directory per base model (the toy world writes the same)::

    <root>/annotations.csv          header `layer,unit,summary`; one row per description
    <root>/<layer>/masks.npy        uint8 {0, 1} (U, k, 1, H, W)
    <root>/<layer>/images.npy       uint8 (U, k, 3, H, W) RGB; optional (absent when
                                    images are not redistributed)
    <root>/<layer>/ids.csv          U rows of k comma-separated probe-dataset indices
    <root>/<layer>/activations.csv  U rows of k comma-separated floats, each exemplar's
                                    spatial max activation

`<layer>` is the layer name exactly as in annotations.csv; `unit` indexes the first
axis of that layer's arrays. Arrays are memory-mapped, not read whole. Only units
with at least `min_descriptions` (3) descriptions are kept; train/validation splits
are by unit, so no unit's exemplars appear on both sides.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.errors import InvalidArgument, NotFound

ANNOTATIONS_FILE = "annotations.csv"
ANNOTATION_COLUMNS = ("layer", "unit", "summary")
MIN_DESCRIPTIONS = 3


@dataclass(frozen=True)
class LayerExemplars:
    """The exemplar arrays of one layer (memory-mapped)."""

    layer: str
    masks: np.ndarray  # (U, k, 1, H, W) uint8 {0, 1}
    images: np.ndarray | None  # (U, k, 3, H, W) uint8, None when not included
    ids: np.ndarray  # (U, k) int64 probe-dataset indices
    activations: np.ndarray  # (U, k) float32

    @property
    def n_units(self) -> int:
        """U, the number of units with exemplars."""
        return int(self.masks.shape[0])


@dataclass(frozen=True)
class AnnotatedUnit:
    """One unit and its human descriptions."""

    layer: str
    unit: int
    descriptions: tuple[str, ...]


@dataclass(frozen=True)
class Milannotations:
    """A loaded MILANNOTATIONS directory: kept units and the exemplars of their layers."""

    root: Path
    layers: dict[str, LayerExemplars]
    units: tuple[AnnotatedUnit, ...]  # sorted by (layer, unit)

    @property
    def image_size(self) -> int:
        """Side of the (square) exemplar images: H of the first layer's images, else masks."""
        exemplars = next(iter(self.layers.values()))
        array = exemplars.images if exemplars.images is not None else exemplars.masks
        return int(array.shape[-2])

    def images_of(self, units: list[AnnotatedUnit]) -> np.ndarray:
        """Exemplar images of `units`: (len(units), k, 3, H, W) uint8."""
        stacks = []
        for unit in units:
            images = self.layers[unit.layer].images
            if images is None:
                raise NotFound(
                    f"{self.root / unit.layer / 'images.npy'} is missing; images are needed here",
                    field="images",
                )
            stacks.append(images[unit.unit])
        return np.stack(stacks)

    def masks_of(self, units: list[AnnotatedUnit]) -> np.ndarray:
        """Exemplar masks of `units`: (len(units), k, 1, H, W) uint8."""
        return np.stack([self.layers[unit.layer].masks[unit.unit] for unit in units])

    def split(
        self, validation_fraction: float = 0.1, seed: int = 0
    ) -> tuple[list[AnnotatedUnit], list[AnnotatedUnit]]:
        """Split the units (not descriptions) into train and validation, seeded.

        At least one unit lands on each side when there are two or more units.
        """
        if not 0.0 < validation_fraction < 1.0:
            raise InvalidArgument(
                f"is {validation_fraction}; must be in (0, 1)", "validation_fraction"
            )
        if len(self.units) < 2:
            raise InvalidArgument(f"has {len(self.units)} usable units; need 2 to split", "dataset")
        order = np.random.default_rng(seed).permutation(len(self.units))
        n_val = min(max(1, round(validation_fraction * len(self.units))), len(self.units) - 1)
        val = sorted(order[:n_val].tolist())
        train = sorted(order[n_val:].tolist())
        return [self.units[i] for i in train], [self.units[i] for i in val]


def _read_matrix(path: Path, dtype: type[np.generic], n_units: int) -> np.ndarray:
    if not path.is_file():
        raise NotFound(f"{path} is missing", field="milannotations")
    matrix = np.loadtxt(path, delimiter=",", dtype=dtype, ndmin=2)
    if matrix.shape[0] != n_units:
        raise InvalidArgument(
            f"{path} has {matrix.shape[0]} rows for {n_units} units", "milannotations"
        )
    return matrix


def load_layer(root: Path, layer: str) -> LayerExemplars:
    """Memory-map one layer's exemplar arrays from `<root>/<layer>/`."""
    folder = root / layer
    masks_path, images_path = folder / "masks.npy", folder / "images.npy"
    if not masks_path.is_file():
        raise NotFound(f"{masks_path} is missing", field="milannotations")
    masks = np.load(masks_path, mmap_mode="r")
    images = np.load(images_path, mmap_mode="r") if images_path.is_file() else None
    n_units = masks.shape[0]
    if images is not None and images.shape[:2] != masks.shape[:2]:
        raise InvalidArgument(
            f"{images_path} has (U, k) = {images.shape[:2]} but masks {masks.shape[:2]}",
            "milannotations",
        )
    return LayerExemplars(
        layer=layer,
        masks=masks,
        images=images,
        ids=_read_matrix(folder / "ids.csv", np.int64, n_units),
        activations=_read_matrix(folder / "activations.csv", np.float32, n_units),
    )


def load_milannotations(root: Path, min_descriptions: int = MIN_DESCRIPTIONS) -> Milannotations:
    """Load a MILANNOTATIONS directory, keeping units with ≥ `min_descriptions` descriptions."""
    path = root / ANNOTATIONS_FILE
    if not path.is_file():
        raise NotFound(f"{path} is missing", field="milannotations")
    descriptions: dict[tuple[str, int], list[str]] = defaultdict(list)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != ANNOTATION_COLUMNS:
            raise InvalidArgument(
                f"{path} has columns {reader.fieldnames}; want {list(ANNOTATION_COLUMNS)}",
                "milannotations",
            )
        for row in reader:
            summary = row["summary"].strip()
            if summary:
                descriptions[(row["layer"], int(row["unit"]))].append(summary)
    kept = sorted(key for key, texts in descriptions.items() if len(texts) >= min_descriptions)
    layers = {layer: load_layer(root, layer) for layer in sorted({layer for layer, _ in kept})}
    for layer, unit in kept:
        if not 0 <= unit < layers[layer].n_units:
            raise InvalidArgument(
                f"{path} names unit {unit} of {layer!r}, which has {layers[layer].n_units} units",
                "milannotations",
            )
    units = tuple(
        AnnotatedUnit(layer, unit, tuple(descriptions[(layer, unit)])) for layer, unit in kept
    )
    return Milannotations(root, layers, units)
