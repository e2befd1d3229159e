"""ImageFolder probe datasets: class folders become image-level concepts of category `class`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.errors import FailedPrecondition, InvalidArgument
from services.extractor.imagefolder import read_imagefolder
from services.extractor.probe_dataset import OutsideRoot


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12, 3), value, dtype=np.uint8)).save(path)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    _image(root / "train" / "dog" / "d2.png", 1)
    _image(root / "train" / "dog" / "d1.jpg", 2)
    _image(root / "train" / "cat" / "nested" / "c1.png", 3)
    _image(root / "val" / "cat" / "c9.png", 4)
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return root


def test_classes_become_image_level_concepts(folder: Path) -> None:
    dataset = read_imagefolder(folder / "train")
    assert [c.name for c in dataset.concepts] == ["cat", "dog"]
    assert [c.number for c in dataset.concepts] == [1, 2]
    assert {c.category for c in dataset.concepts} == {"class"}
    assert [c.frequency for c in dataset.concepts] == [1, 2]
    assert [row.name for row in dataset.rows] == ["cat/nested/c1.png", "dog/d1.jpg", "dog/d2.png"]
    assert [row.image_labels for row in dataset.rows] == [(1,), (2,), (2,)]
    assert dataset.plane_categories == [] and dataset.categories == ["class"]
    pixel, image = dataset.load_labels(dataset.rows[1])
    assert pixel.shape == (0, 112, 112)
    np.testing.assert_array_equal(image, [2])
    assert dataset.load_image(dataset.rows[0]).size == (12, 10)


def test_split_limit_and_key(folder: Path) -> None:
    val = read_imagefolder(folder, split="val")
    assert [row.name for row in val.rows] == ["cat/c9.png"]
    limited = read_imagefolder(folder / "train", limit=2)
    assert len(limited.rows) == 2
    assert limited.fingerprint != read_imagefolder(folder / "train").fingerprint
    with pytest.raises(InvalidArgument, match=r"dataset.split"):
        read_imagefolder(folder, split="test")


def test_not_an_image_folder(tmp_path: Path, folder: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FailedPrecondition, match=r"no class subdirectories"):
        read_imagefolder(tmp_path / "empty")
    with pytest.raises(InvalidArgument, match=r"one category"):
        read_imagefolder(folder / "train", categories=["object"])


def test_entries_that_escape_are_rows_that_cannot_be_read(folder: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _image(outside / "secret.png", 9)
    (folder / "train" / "dog" / "zz.png").symlink_to(outside / "secret.png")
    (folder / "train" / "elsewhere").symlink_to(outside, target_is_directory=True)
    dataset = read_imagefolder(folder / "train")
    names = [row.name for row in dataset.rows]
    assert "dog/zz.png" in names and "elsewhere/secret.png" in names
    for row in dataset.rows:
        if row.name in ("dog/zz.png", "elsewhere/secret.png"):
            with pytest.raises(OutsideRoot, match=r"outside the dataset root"):
                dataset.load_image(row)
        else:
            dataset.load_image(row)
    with pytest.raises(InvalidArgument, match=r"^dataset.split: .*leads outside"):
        read_imagefolder(folder / "train", split="../val")
