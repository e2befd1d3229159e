from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.toyworld.annotations import LAYERS, write_annotations
from services.toyworld.layout import sample_spec
from services.toyworld.raster import PALETTE, rasterize
from services.toyworld.world import WORLD

SIZE, K, SEED = 32, 5, 7


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_annotations(tmp_path_factory.mktemp("milan"), n_images=120, image_size=SIZE,
                             seed=SEED, k=K)  # fmt: skip


def test_array_shapes_and_dtypes(root: Path) -> None:
    for layer in LAYERS:
        units = len(layer.concepts)
        images = np.load(root / layer.name / "images.npy")
        masks = np.load(root / layer.name / "masks.npy")
        assert images.shape == (units, K, 3, SIZE, SIZE) and images.dtype == np.uint8
        assert masks.shape == (units, K, 1, SIZE, SIZE) and masks.dtype == np.uint8
        assert set(np.unique(masks)) == {0, 1}
        assert (masks.reshape(units, K, -1).max(axis=2) == 1).all()  # no empty exemplar mask
        ids = np.loadtxt(root / layer.name / "ids.csv", delimiter=",", dtype=np.int64, ndmin=2)
        acts = np.loadtxt(root / layer.name / "activations.csv", delimiter=",", ndmin=2)
        assert ids.shape == acts.shape == (units, K)
        assert (np.diff(acts, axis=1) <= 0).all() and (acts > 0).all()


def test_three_descriptions_per_unit(root: Path) -> None:
    with (root / "annotations.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["layer", "unit", "summary"]
    counts = Counter((r["layer"], int(r["unit"])) for r in rows)
    expected = {(layer.name, u) for layer in LAYERS for u in range(len(layer.concepts))}
    assert set(counts) == expected and set(counts.values()) == {3}
    red = [r["summary"] for r in rows if r["layer"] == "colors" and r["unit"] == "0"]
    assert red == ["red regions", "the colour red", "red things"]


def test_exemplars_are_the_images_with_their_concept_masks(root: Path) -> None:
    ids = np.loadtxt(root / "colors" / "ids.csv", delimiter=",", dtype=np.int64, ndmin=2)
    images = np.load(root / "colors" / "images.npy")
    masks = np.load(root / "colors" / "masks.npy")
    for unit, color in enumerate(WORLD.color_names):
        for j, index in enumerate(ids[unit]):
            raster = rasterize(sample_spec(SEED, int(index)), SIZE)
            assert (images[unit, j] == raster.rgb.transpose(2, 0, 1)).all()
            is_color = (images[unit, j].transpose(1, 2, 0) == PALETTE[unit]).all(axis=-1)
            assert (masks[unit, j, 0] == is_color).all(), color
    shape_ids = np.loadtxt(root / "shapes" / "ids.csv", delimiter=",", dtype=np.int64, ndmin=2)
    for unit, kind in enumerate(WORLD.shapes):
        for index in shape_ids[unit]:
            assert kind in [s.kind for s in sample_spec(SEED, int(index)).shapes]


def test_concepts_file_names_the_ground_truth(root: Path) -> None:
    with (root / "concepts.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["layer"], r["label"]) for r in rows] == [
        (layer.name, c) for layer in LAYERS for c in layer.concepts
    ]


def test_too_few_images_for_k_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as error:
        write_annotations(tmp_path, n_images=4, image_size=SIZE, k=K)
    assert error.value.field == "n_images"
