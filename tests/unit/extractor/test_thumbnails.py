"""Materialize: PNG thumbnails of probe images by probe index."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from neurodissect.v1 import common_pb2, extractor_pb2
from PIL import Image

from services.common import keys
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.settings import Settings
from services.common.store import LocalStore
from services.extractor.broden import read_broden
from services.extractor.extraction import ComputeConfig, Extraction, ExtractionResult
from services.extractor.models import ModelSource
from services.extractor.servicer import ExtractorServicer
from services.toyworld.generator import generate


def test_materialize_thumbnails(tmp_path: Path, toy_root: Path, conv_source: ModelSource) -> None:
    store = LocalStore(tmp_path / "store")
    dataset = read_broden(toy_root)
    result = list(Extraction(store, dataset, conv_source, ["0"], ComputeConfig()).run())[-1]
    assert isinstance(result, ExtractionResult)
    servicer = ExtractorServicer(Settings(cache_dir=str(tmp_path / "cache")), store)
    spec = common_pb2.DatasetSpec(kind="broden", uri=str(toy_root))

    def materialize(**fields: object) -> list[str]:
        request = extractor_pb2.MaterializeRequest(dataset=spec, **fields)
        return list(servicer.Materialize(request, None).keys)  # type: ignore[arg-type]

    stored = materialize(dataset_key=result.dataset_key, image_ids=[3, 0], size=16)
    assert stored == [
        keys.thumbnail(result.dataset_key, 3, 16),
        keys.thumbnail(result.dataset_key, 0, 16),
    ]
    thumb = Image.open(io.BytesIO(store.get(stored[0])))
    assert thumb.format == "PNG" and thumb.size == (16, 16)
    original = dataset.load_image(dataset.rows[3]).resize((16, 16), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(thumb.convert("RGB")), np.asarray(original))
    # Without dataset_key: the key of the dataset with the default chunking.
    assert materialize(image_ids=[5]) == [keys.thumbnail(result.dataset_key, 5, 0)]
    original_size = store.get(keys.thumbnail(result.dataset_key, 5, 0))
    assert Image.open(io.BytesIO(original_size)).size == (32, 32)
    with pytest.raises(InvalidArgument, match=r"image_ids\[1\].*0\.\.63"):
        materialize(dataset_key=result.dataset_key, image_ids=[1, 64])
    spec.limit = 10  # another selection: never extracted, and not the stored dataset
    with pytest.raises(FailedPrecondition, match="run Extract"):
        materialize(image_ids=[1])
    with pytest.raises(InvalidArgument, match="not the one stored"):
        materialize(dataset_key=result.dataset_key, image_ids=[1])


def test_an_image_swapped_for_a_symlink_out_is_never_materialized(
    tmp_path: Path, conv_source: ModelSource
) -> None:
    root = generate(tmp_path / "toy", 8, 32, seed=1)
    store = LocalStore(tmp_path / "store")
    result = list(Extraction(store, read_broden(root), conv_source, ["0"], ComputeConfig(
        image_chunk=4)).run())[-1]
    assert isinstance(result, ExtractionResult) and result.bad_images == 0
    outside = tmp_path / "secret.png"
    Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8)).save(outside)
    (root / "images" / "toy_000002.png").unlink()
    (root / "images" / "toy_000002.png").symlink_to(outside)
    servicer = ExtractorServicer(Settings(cache_dir=str(tmp_path / "cache")), store)
    request = extractor_pb2.MaterializeRequest(
        dataset=common_pb2.DatasetSpec(kind="broden", uri=str(root)),
        dataset_key=result.dataset_key, image_ids=[2])
    with pytest.raises(FailedPrecondition, match=r"cannot read probe image 2: .*outside"):
        servicer.Materialize(request, None)  # type: ignore[arg-type]
    assert not store.exists(keys.thumbnail(result.dataset_key, 2, 0))
