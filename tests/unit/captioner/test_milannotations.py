from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from services.captioner.milannotations import AnnotatedUnit, load_milannotations
from services.common.errors import InvalidArgument, NotFound
from tests.unit.captioner.synthetic import write_milannotations


def _three(name: str) -> list[str]:
    return [f"{name} one", f"{name} two", f"{name} three"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    descriptions = {
        ("conv1", 0): _three("a"),
        ("conv1", 1): ["only", "two"],  # dropped: fewer than 3
        ("conv1", 2): [*_three("c"), "c four"],
        ("layer2", 0): _three("d"),
        ("layer2", 3): _three("e"),
        ("layer2", 1): ["one"],  # dropped
        ("layer2", 2): [*_three("f")[:2], "   "],  # blank summaries do not count
    }
    return write_milannotations(tmp_path / "base", {"conv1": 3, "layer2": 4}, 5, 8, descriptions)


def test_keeps_only_units_with_at_least_three_descriptions(root: Path) -> None:
    data = load_milannotations(root)
    kept = [(u.layer, u.unit) for u in data.units]
    assert kept == [("conv1", 0), ("conv1", 2), ("layer2", 0), ("layer2", 3)]
    assert data.units[1].descriptions == ("c one", "c two", "c three", "c four")
    assert len(load_milannotations(root, min_descriptions=1).units) == 7


def test_layer_arrays_are_loaded_with_their_shapes(root: Path) -> None:
    data = load_milannotations(root)
    conv1 = data.layers["conv1"]
    assert conv1.masks.shape == (3, 5, 1, 8, 8) and conv1.masks.dtype == np.uint8
    assert conv1.images is not None and conv1.images.shape == (3, 5, 3, 8, 8)
    assert conv1.ids.shape == (3, 5) and conv1.activations.shape == (3, 5)
    units = list(data.units[:2])
    assert data.images_of(units).shape == (2, 5, 3, 8, 8)
    np.testing.assert_array_equal(data.masks_of(units)[1], conv1.masks[2])


def test_split_is_by_unit_seeded_and_covers_every_unit(root: Path) -> None:
    data = load_milannotations(root)
    train, val = data.split(validation_fraction=0.25, seed=1)

    def keys(units: Iterable[AnnotatedUnit]) -> set[tuple[str, int]]:
        return {(u.layer, u.unit) for u in units}

    assert len(val) == 1 and len(train) == 3
    assert keys(train).isdisjoint(keys(val))
    assert keys(train) | keys(val) == keys(data.units)
    assert data.split(0.25, seed=1) == (train, val)
    assert len({tuple(map(str, data.split(0.25, seed=s)[1])) for s in range(20)}) > 1


def test_images_are_optional(root: Path) -> None:
    (root / "conv1" / "images.npy").unlink()
    data = load_milannotations(root)
    assert data.layers["conv1"].images is None
    with pytest.raises(NotFound, match=r"images\.npy"):
        data.images_of([data.units[0]])


def test_missing_and_malformed_files_are_clear_errors(root: Path) -> None:
    (root / "layer2" / "ids.csv").unlink()
    with pytest.raises(NotFound, match=r"ids\.csv"):
        load_milannotations(root)
    (root / "annotations.csv").write_text("layer,neuron,text\nconv1,0,x\n")
    with pytest.raises(InvalidArgument, match="columns"):
        load_milannotations(root)
    (root / "annotations.csv").unlink()
    with pytest.raises(NotFound, match=r"annotations\.csv"):
        load_milannotations(root)


def test_unit_out_of_range_is_an_error(tmp_path: Path) -> None:
    root = write_milannotations(tmp_path / "b", {"conv1": 2}, 3, 8, {("conv1", 5): _three("x")})
    with pytest.raises(InvalidArgument, match="unit 5"):
        load_milannotations(root)
