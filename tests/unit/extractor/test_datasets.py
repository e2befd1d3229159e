"""Opening probe datasets by kind, and the toy world generated on first use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.settings import Settings
from services.extractor.datasets import DatasetRequest, open_dataset


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=str(tmp_path / "cache"))


def _toy(**fields: object) -> DatasetRequest:
    return DatasetRequest(kind="toyworld", toy_n_images=12, toy_image_size=32, **fields)


def test_toy_world_is_generated_once_under_the_cache(settings: Settings, tmp_path: Path) -> None:
    dataset = open_dataset(_toy(), settings)
    root = tmp_path / "cache" / "toyworld" / "n12-s32-seed0"
    assert dataset.root == root and dataset.kind == "broden"
    assert len(dataset.rows) == 12 and dataset.image_size == (32, 32)
    assert json.loads((root / "toyworld.json").read_text())["n_images"] == 12
    stamp = (root / "index.csv").stat().st_mtime_ns
    again = open_dataset(_toy(), settings)
    assert (root / "index.csv").stat().st_mtime_ns == stamp
    assert again.fingerprint == dataset.fingerprint
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".tmp-")]
    assert len(open_dataset(_toy(split="val", limit=1), settings).rows) == 1


def test_toy_world_at_a_given_uri(settings: Settings, tmp_path: Path) -> None:
    target = tmp_path / "mine"
    open_dataset(_toy(uri=str(target)), settings)
    assert (target / "index.csv").is_file()
    with pytest.raises(FailedPrecondition, match=r"generated with"):
        open_dataset(DatasetRequest(kind="toyworld", uri=str(target), toy_n_images=13,
                                    toy_image_size=32), settings)
    clutter = tmp_path / "clutter"
    clutter.mkdir()
    (clutter / "notes.txt").write_text("mine")
    with pytest.raises(FailedPrecondition, match=r"index.csv is missing"):
        open_dataset(_toy(uri=str(clutter)), settings)


def test_kinds_and_paths(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"dataset.kind.*'broden', 'imagefolder'"):
        open_dataset(DatasetRequest(kind="coco", uri=str(tmp_path)), settings)
    with pytest.raises(NotFound, match=r"dataset.uri"):
        open_dataset(DatasetRequest(kind="broden", uri=str(tmp_path / "nope")), settings)
    with pytest.raises(InvalidArgument, match=r"only local paths"):
        open_dataset(DatasetRequest(kind="broden", uri="s3://bucket/broden"), settings)
    with pytest.raises(InvalidArgument, match=r"may not contain '\.\.'"):
        open_dataset(DatasetRequest(kind="broden", uri=f"{tmp_path}/../x"), settings)
    with pytest.raises(FailedPrecondition, match=r"index.csv is missing"):
        open_dataset(DatasetRequest(kind="broden", uri=f"file://{tmp_path}"), settings)
    folder = tmp_path / "folder" / "cat"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(folder / "a.png")
    dataset = open_dataset(DatasetRequest(kind="imagefolder", uri=str(folder.parent)), settings)
    assert [c.name for c in dataset.concepts] == ["cat"]
