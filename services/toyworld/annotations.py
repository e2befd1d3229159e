"""Toy MILANNOTATIONS data (specs/milan.md): concept-detector units, exemplars, descriptions.

Written under `root`:

- `annotations.csv`: `layer,unit,summary`, three template descriptions per unit.
- `concepts.csv`: `layer,unit,label`, the concept each unit detects (ground truth).
- `{layer}/images.npy` (U, k, 3, S, S) uint8, `{layer}/masks.npy` (U, k, 1, S, S) uint8 in {0, 1},
  `{layer}/ids.csv` (U rows × k dataset indices), `{layer}/activations.csv` (U rows × k),
  the last two without header, as MILAN's `numpy.savetxt` writes them.

Layers: `colors` (one unit per colour), `shapes` (one per shape), `textures` (one per texture).
A unit's activation on an image is the fraction of the image its concept covers; its
exemplars are the k images where that fraction is largest, its masks the concept's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.errors import InvalidArgument
from services.toyworld.generator import write_csv
from services.toyworld.layout import ImageSpec, sample_spec
from services.toyworld.raster import Raster, rasterize
from services.toyworld.world import WORLD


@dataclass(frozen=True)
class UnitLayer:
    """A layer of concept-detector units and the description templates of its units."""

    name: str
    concepts: tuple[str, ...]
    templates: tuple[str, str, str]  # formatted with {name}, {plural}, {adjective}


LAYERS = (
    UnitLayer(
        "colors", WORLD.color_names, ("{name} regions", "the colour {name}", "{name} things")
    ),
    UnitLayer("shapes", WORLD.shapes, ("{name} shapes", "a {name}", "{plural}")),
    UnitLayer(
        "textures", WORLD.textures, ("{adjective} patterns", "{name}", "a {adjective} background")
    ),
)


def descriptions(layer: UnitLayer, concept: str) -> list[str]:
    """The three descriptions of the unit of `layer` that detects `concept`."""
    plural = concept + ("es" if concept.endswith("s") else "s")
    adjective = WORLD.adjective(concept) if concept in WORLD.textures else concept
    return [t.format(name=concept, plural=plural, adjective=adjective) for t in layer.templates]


def write_annotations(
    root: Path, n_images: int = 400, image_size: int = 64, seed: int = 0, k: int = 15
) -> Path:
    """Write the toy MILANNOTATIONS directory from images 0..n_images-1 of dataset `seed`."""
    if k < 1:
        raise InvalidArgument(f"must be at least 1, got {k}", field="k")
    root = Path(root)
    specs = [sample_spec(seed, i) for i in range(n_images)]
    rasters = [rasterize(spec, image_size) for spec in specs]
    rows: list[list[str]] = []
    concept_rows: list[list[str]] = []
    for layer in LAYERS:
        masks = np.stack(
            [
                np.stack([_mask(layer.name, c, s, r) for s, r in zip(specs, rasters, strict=True)])
                for c in layer.concepts
            ]
        )  # (U, N, S, S) bool
        _write_layer(root / layer.name, layer, masks, rasters, k)
        for unit, concept in enumerate(layer.concepts):
            rows += [[layer.name, str(unit), d] for d in descriptions(layer, concept)]
            concept_rows.append([layer.name, str(unit), concept])
    write_csv(root / "annotations.csv", ("layer", "unit", "summary"), rows)
    write_csv(root / "concepts.csv", ("layer", "unit", "label"), concept_rows)
    return root


def _mask(layer: str, concept: str, spec: ImageSpec, raster: Raster) -> np.ndarray:
    """(S, S) bool: where `concept` is in one image (a texture: the visible background)."""
    if layer == "colors":
        return np.asarray(raster.color == WORLD.color_names.index(concept))
    if layer == "shapes":
        of_kind = np.array([s.kind == concept for s in spec.shapes] + [False])
        return np.asarray(of_kind[raster.shape])  # index -1 (background) reads the False
    return np.asarray((raster.shape < 0) & (spec.texture.kind == concept))


def _write_layer(
    folder: Path, layer: UnitLayer, masks: np.ndarray, rasters: list[Raster], k: int
) -> None:
    """Pick each unit's top-k images by concept coverage and write the four arrays."""
    coverage = masks.mean(axis=(2, 3))  # (U, N)
    order = np.argsort(-coverage, axis=1, kind="stable")[:, :k]  # (U, k)
    for unit, concept in enumerate(layer.concepts):
        present = int((coverage[unit] > 0).sum())
        if present < k:
            raise InvalidArgument(
                f"{concept!r} appears in {present} images, fewer than k={k}", field="n_images"
            )
    images = np.stack([r.rgb for r in rasters]).transpose(0, 3, 1, 2)  # (N, 3, S, S)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", images[order])
    unit_index = np.arange(len(layer.concepts))[:, None]
    np.save(folder / "masks.npy", masks[unit_index, order][:, :, None].astype(np.uint8))
    np.savetxt(folder / "ids.csv", order, delimiter=",", fmt="%i")
    activations = np.take_along_axis(coverage, order, axis=1)
    np.savetxt(folder / "activations.csv", activations, delimiter=",", fmt="%.5e")
