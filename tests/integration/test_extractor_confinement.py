"""Hostile datasets against a real extractor process: files that escape the dataset root
are counted as bad images and never stored, and a job's toy world is bounded, generated
only into the cache, reports progress and stops when its call is cancelled."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from neurodissect.v1 import common_pb2, extractor_pb2, extractor_pb2_grpc
from PIL import Image

from services.common.client import open_channel, wait_healthy
from services.common.settings import Settings
from services.common.store import LocalStore
from services.toyworld.generator import generate
from tests.fixtures.ports import free_port
from tests.fixtures.processes import stop

REPO = Path(__file__).resolve().parents[2]
N_TOY = 12
SECRET = (7, 201, 99)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Path]]:
    root = tmp_path_factory.mktemp("confinement")
    (root / "data").mkdir()
    port = free_port()
    settings = Settings(
        store_url=f"file://{root / 'store'}",
        cache_dir=str(root / "cache"),
        data_roots=str(root / "data"),
        port=port,
        metrics_port=0,
        extractor_addr=f"127.0.0.1:{port}",
    )
    env = {**os.environ, **settings.environment(), "PYTHONPATH": str(REPO)}
    with (root / "server.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.extractor"], cwd=REPO, env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(settings.extractor_addr, settings, timeout=60)
            yield settings, root
        finally:
            stop(process)


@pytest.fixture(scope="module")
def stub(server: tuple[Settings, Path]) -> Iterator[extractor_pb2_grpc.ExtractorStub]:
    settings, _ = server
    with open_channel(settings.extractor_addr, settings) as channel:
        yield extractor_pb2_grpc.ExtractorStub(channel)


def _secret(root: Path) -> Path:
    """An image outside the data roots, one colour that no toy image has everywhere."""
    path = root / "outside" / "secret.png"
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), SECRET, dtype=np.uint8)).save(path)
    return path


def _append_rows(index: Path, rows: list[dict[str, str]]) -> None:
    with index.open(newline="") as handle:
        header = next(csv.reader(handle))
    with index.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, header, lineterminator="\n")
        writer.writerows(rows)


def _extract(
    stub: extractor_pb2_grpc.ExtractorStub, dataset: common_pb2.DatasetSpec
) -> extractor_pb2.ExtractProgress:
    request = extractor_pb2.ExtractRequest(
        job_id="confinement",
        model=common_pb2.ModelSpec(source="toy", name="planted", input_size=32),
        layers=["colors"],
        dataset=dataset,
        compute=common_pb2.ComputeSpec(batch_size=8, image_chunk_size=8, unit_block_size=16),
    )
    final = list(stub.Extract(request, timeout=120))[-1]
    assert final.finished
    return final


def _materialized(
    stub: extractor_pb2_grpc.ExtractorStub, store: LocalStore, dataset: common_pb2.DatasetSpec,
    final: extractor_pb2.ExtractProgress,
) -> list[np.ndarray]:
    response = stub.Materialize(extractor_pb2.MaterializeRequest(
        dataset=dataset, dataset_key=final.dataset_key,
        image_ids=list(range(final.images_total))), timeout=60)
    return [np.asarray(Image.open(io.BytesIO(store.get(k))).convert("RGB"))
            for k in response.keys]


def _is_secret(pixels: np.ndarray) -> bool:
    return bool((pixels == np.array(SECRET, dtype=np.uint8)).all())


def test_escaping_broden_rows_are_bad_images_and_never_stored(
    server: tuple[Settings, Path], stub: extractor_pb2_grpc.ExtractorStub
) -> None:
    _, root = server
    _secret(root)
    broden = generate(root / "data" / "broden", N_TOY, 32, seed=2)
    images = broden / "images"
    (images / "extra.png").write_bytes((images / "toy_000003.png").read_bytes())
    _append_rows(broden / "index.csv", [
        # An image row that climbs out of images/ and the data root.
        {"image": "../../../outside/secret.png", "split": "train", "ih": "32", "iw": "32",
         "sh": "16", "sw": "16", "color": "toy_000003_color.png"},
        # A readable image whose label PNG escapes.
        {"image": "extra.png", "split": "train", "ih": "32", "iw": "32", "sh": "16",
         "sw": "16", "color": "../../../outside/secret.png"},
    ])
    (images / "toy_000001.png").unlink()
    (images / "toy_000001.png").symlink_to(root / "outside" / "secret.png")
    dataset = common_pb2.DatasetSpec(kind="broden", uri=str(broden), max_bad_fraction=0.5)
    final = _extract(stub, dataset)
    assert final.bad_images == 3
    assert set(final.bad_image_examples) == {
        "../../../outside/secret.png", "extra.png", "toy_000001.png"}
    assert final.images_total == N_TOY + 2 - 3
    store = LocalStore(root / "store")
    thumbnails = _materialized(stub, store, dataset, final)
    assert len(thumbnails) == final.images_total
    assert not any(_is_secret(t) for t in thumbnails)


def test_a_symlink_out_of_an_image_folder_is_a_bad_image(
    server: tuple[Settings, Path], stub: extractor_pb2_grpc.ExtractorStub
) -> None:
    _, root = server
    secret = _secret(root)
    folder = root / "data" / "folder"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        for k in range(3):
            pixels = np.full((32, 32, 3), 40 * k + (0 if name == "cat" else 120), np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{k}.png")
    (folder / "cat" / "zz_evil.png").symlink_to(secret)
    (folder / "outside_class").symlink_to(secret.parent, target_is_directory=True)
    dataset = common_pb2.DatasetSpec(kind="imagefolder", uri=str(folder), max_bad_fraction=0.5)
    final = _extract(stub, dataset)
    assert final.bad_images == 2
    assert set(final.bad_image_examples) == {"cat/zz_evil.png", "outside_class/secret.png"}
    assert final.images_total == 6
    thumbnails = _materialized(stub, LocalStore(root / "store"), dataset, final)
    assert not any(_is_secret(t) for t in thumbnails)


def test_too_many_escapes_fail_the_extraction_naming_them(
    server: tuple[Settings, Path], stub: extractor_pb2_grpc.ExtractorStub
) -> None:
    _, root = server
    _secret(root)
    broden = generate(root / "data" / "broden-strict", N_TOY, 32, seed=4)
    _append_rows(broden / "index.csv", [
        {"image": "../../../outside/secret.png", "split": "train", "ih": "32", "iw": "32",
         "sh": "16", "sw": "16", "color": "toy_000003_color.png"}])
    with pytest.raises(grpc.RpcError) as caught:
        _extract(stub, common_pb2.DatasetSpec(kind="broden", uri=str(broden)))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "dataset.max_bad_fraction" in caught.value.details()
    assert "../../../outside/secret.png" in caught.value.details()


def test_toy_world_limits_and_uri_are_refused_before_any_work(
    server: tuple[Settings, Path], stub: extractor_pb2_grpc.ExtractorStub
) -> None:
    settings, root = server
    cases = [
        (common_pb2.DatasetSpec(kind="toyworld", uri=str(root / "data" / "here")),
         grpc.StatusCode.INVALID_ARGUMENT, "dataset.uri"),
        (common_pb2.DatasetSpec(kind="toyworld", toyworld=common_pb2.ToyWorldParams(
            n_images=200_000, image_size=1024)),
         grpc.StatusCode.INVALID_ARGUMENT, "dataset.toyworld.n_images"),
        (common_pb2.DatasetSpec(kind="toyworld", toyworld=common_pb2.ToyWorldParams(
            n_images=20_000, image_size=256)),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "dataset.toyworld.n_images"),
    ]
    for dataset, code, field in cases:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            _extract(stub, dataset)
        assert caught.value.code() == code and caught.value.details().startswith(f"{field}: ")
        assert time.monotonic() - started < 10
    assert not (root / "data" / "here").exists()
    assert not (Path(settings.cache_dir) / "toyworld").exists()


def test_toy_world_generation_streams_progress_and_stops_on_cancel(
    server: tuple[Settings, Path], stub: extractor_pb2_grpc.ExtractorStub
) -> None:
    settings, _ = server
    request = extractor_pb2.ExtractRequest(
        job_id="toy-cancel",
        model=common_pb2.ModelSpec(source="toy", name="planted"),
        layers=["colors"],
        dataset=common_pb2.DatasetSpec(kind="toyworld", toyworld=common_pb2.ToyWorldParams(
            n_images=4000, image_size=32, seed=5)),  # about 20 s of generation
    )
    call = stub.Extract(request, timeout=120)
    seen = []
    for message in call:
        seen.append(message)
        if message.images_done > 0:
            break
    assert all(m.message == "generating the toy world" for m in seen)
    assert seen[-1].images_total == 4000 and 0 < seen[-1].images_done < 4000
    call.cancel()
    cache = Path(settings.cache_dir) / "toyworld"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(p.is_dir() for p in cache.iterdir()):
        time.sleep(0.1)
    assert [p for p in cache.iterdir() if p.is_dir()] == []
