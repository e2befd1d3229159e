"""Opening probe datasets by kind, and the toy world generated on first use."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common import keys
from services.common.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.common.settings import Settings
from services.extractor import datasets
from services.extractor.datasets import (
    DatasetRequest,
    GenerationProgress,
    open_dataset,
    toy_world_generation,
    toy_world_root,
)
from services.toyworld import limits
from services.toyworld.generator import FORMAT_VERSION as TOY_FORMAT_VERSION


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=str(tmp_path / "cache"))


def _toy(**fields: object) -> DatasetRequest:
    return DatasetRequest(**{"kind": "toyworld", "toy_n_images": 12, "toy_image_size": 32,
                             **fields})  # type: ignore[arg-type]


def test_toy_world_is_generated_once_under_the_cache(settings: Settings, tmp_path: Path) -> None:
    dataset = open_dataset(_toy(), settings)
    params = {"n_images": 12, "image_size": 32, "seed": 0}
    root = toy_world_root(params, settings)
    assert root.parent == (tmp_path / "cache" / "toyworld").resolve()
    assert root.name == keys.content_key("toyworld", TOY_FORMAT_VERSION, params)
    assert dataset.root == root and dataset.kind == "broden"
    assert len(dataset.rows) == 12 and dataset.image_size == (32, 32)
    assert json.loads((root / "toyworld.json").read_text())["n_images"] == 12
    stamp = (root / "index.csv").stat().st_mtime_ns
    again = open_dataset(_toy(), settings)
    assert (root / "index.csv").stat().st_mtime_ns == stamp
    assert again.fingerprint == dataset.fingerprint
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".tmp-")]
    assert len(open_dataset(_toy(split="val", limit=1), settings).rows) == 1
    other = open_dataset(_toy(toy_seed=1), settings)
    assert other.root != root and other.fingerprint != dataset.fingerprint


def test_a_toy_world_is_never_written_where_the_spec_says(
    settings: Settings, tmp_path: Path
) -> None:
    target = tmp_path / "mine"
    with pytest.raises(InvalidArgument, match=r"^dataset.uri: .*cannot be placed"):
        open_dataset(_toy(uri=str(target)), settings)
    assert not target.exists()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("n_images", "image_size", "error", "field"),
    [
        (200_000, 0, InvalidArgument, "dataset.toyworld.n_images"),
        (limits.MAX_IMAGES + 1, 16, InvalidArgument, "dataset.toyworld.n_images"),
        (-1, 0, InvalidArgument, "dataset.toyworld.n_images"),
        (10, 1024, InvalidArgument, "dataset.toyworld.image_size"),
        (10, 33, InvalidArgument, "dataset.toyworld.image_size"),
        (10, 8, InvalidArgument, "dataset.toyworld.image_size"),
        (limits.MAX_IMAGES, limits.MAX_IMAGE_SIZE, ResourceExhausted,
         "dataset.toyworld.n_images"),
    ],
)
def test_toy_world_size_limits(
    settings: Settings, tmp_path: Path, n_images: int, image_size: int,
    error: type[Exception], field: str,
) -> None:
    request = DatasetRequest(kind="toyworld", toy_n_images=n_images, toy_image_size=image_size)
    with pytest.raises(error, match=rf"^{field}: "):
        open_dataset(request, settings)
    assert not (tmp_path / "cache").exists()


def test_generation_reports_progress(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets, "PROGRESS_INTERVAL_S", 0.02)
    generation = toy_world_generation(_toy(toy_n_images=80), settings, threading.Event())
    seen = []
    while True:
        try:
            seen.append(next(generation))
        except StopIteration as finished:
            root = finished.value
            break
    assert seen[0] == GenerationProgress(0, 80) and len(seen) > 2
    assert all(p.total == 80 for p in seen)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert 0 < seen[-1].done <= 80
    assert (root / "index.csv").is_file()
    assert list(toy_world_generation(_toy(toy_n_images=80), settings, threading.Event())) == []


def test_a_stopped_generation_stops_at_once_and_leaves_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets, "PROGRESS_INTERVAL_S", 0.02)
    stop = threading.Event()
    request = _toy(toy_n_images=5000)  # about 30 s if it ran to the end
    generation = toy_world_generation(request, settings, stop)
    started = time.monotonic()
    assert next(generation).done == 0
    stop.set()
    with pytest.raises(Cancelled, match=r"dataset.toyworld"):
        for _ in generation:
            pass
    assert time.monotonic() - started < 5
    cache = Path(settings.cache_dir) / "toyworld"
    assert [p.suffix for p in cache.iterdir()] == [".lock"]


def test_closing_the_generation_stops_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a cancelled Extract does: its stream is dropped, so the generator is closed."""
    monkeypatch.setattr(datasets, "PROGRESS_INTERVAL_S", 0.02)
    generation = toy_world_generation(_toy(toy_n_images=5000), settings, threading.Event())
    next(generation)
    progress = next(generation)
    started = time.monotonic()
    generation.close()
    assert time.monotonic() - started < 5
    assert progress.done < 5000
    cache = Path(settings.cache_dir) / "toyworld"
    assert [p.suffix for p in cache.iterdir()] == [".lock"]


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
