"""The extractor as a real process (`python -m services.extractor`) over real gRPC."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import torchvision
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from neurodissect.v1 import common_pb2, extractor_pb2, extractor_pb2_grpc

from services.common.activations import read_manifest
from services.common.client import open_channel, wait_healthy
from services.common.settings import Settings
from services.common.store import LocalStore
from services.toyworld.clip import ClipRecipe, build_toy_clip
from tests.fixtures.ports import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Path]]:
    root = tmp_path_factory.mktemp("extractor")
    port = free_port()
    settings = Settings(
        store_url=f"file://{root / 'store'}",
        cache_dir=str(root / "cache"),
        port=port,
        metrics_port=0,
        extractor_addr=f"127.0.0.1:{port}",
    )
    env = {**os.environ, **settings.environment(), "PYTHONPATH": str(REPO)}
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.extractor"], cwd=REPO, env=env, stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(settings.extractor_addr, settings, timeout=60)
        yield settings, root
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0  # SIGTERM: graceful stop
        log.close()


@pytest.fixture(scope="module")
def stub(server: tuple[Settings, Path]) -> Iterator[extractor_pb2_grpc.ExtractorStub]:
    settings, _ = server
    with open_channel(settings.extractor_addr, settings) as channel:
        yield extractor_pb2_grpc.ExtractorStub(channel)


def test_health_and_reflection(server: tuple[Settings, Path]) -> None:
    settings, _ = server
    with open_channel(settings.extractor_addr, settings) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="neurodissect.v1.Extractor"), timeout=5
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"neurodissect.v1.Extractor", "grpc.health.v1.Health"} <= names


def test_describe_extract_materialize_embed(
    server: tuple[Settings, Path], stub: extractor_pb2_grpc.ExtractorStub
) -> None:
    _, root = server
    weights = root / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    model = common_pb2.ModelSpec(source="torchvision", name="resnet18", weights_uri=str(weights))
    described = stub.DescribeModel(common_pb2.DescribeModelRequest(model=model), timeout=120)
    shapes = {layer.name: list(layer.shape) for layer in described.layers}
    assert shapes["layer4"] == [512, 7, 7] and described.input_size == 224

    clip_weights = root / "toy_clip.pt"  # random weights: training is not what is tested here
    torch.save(build_toy_clip(ClipRecipe()).state_dict(), clip_weights)
    clip = common_pb2.ClipModelSpec(arch="toy", weights_uri=str(clip_weights))
    model.input_size = 32
    request = extractor_pb2.ExtractRequest(
        job_id="j1",
        model=model,
        layers=["layer2", "layer4"],
        dataset=common_pb2.DatasetSpec(
            kind="toyworld",
            toyworld=common_pb2.ToyWorldParams(n_images=40, image_size=32, seed=1),
        ),
        compute=common_pb2.ComputeSpec(batch_size=16, image_chunk_size=16, unit_block_size=128),
        clip_models=[clip],
    )
    messages = list(stub.Extract(request, timeout=300))
    final = messages[-1]
    assert final.finished and not final.cached
    assert all(not m.finished for m in messages[:-1])
    assert final.images_total == 40 and final.bad_images == 0
    assert set(final.acts_keys) == {"layer2", "layer4"}
    store = LocalStore(root / "store")
    manifest = read_manifest(store, final.acts_keys["layer4"], "layer4")
    assert manifest.shape == (40, 512, 1, 1) and manifest.dataset_key == final.dataset_key
    embeddings_key = final.image_embedding_keys[f"toy|{clip_weights}"]
    assert store.get_array(embeddings_key).shape == (40, ClipRecipe().embed_dim)
    again = list(stub.Extract(request, timeout=120))[-1]
    assert again.finished and again.cached and again.acts_keys == final.acts_keys

    thumbnails = stub.Materialize(
        extractor_pb2.MaterializeRequest(dataset=request.dataset, dataset_key=final.dataset_key,
                                         image_ids=[0, 39], size=24),
        timeout=60,
    )
    assert len(thumbnails.keys) == 2 and all(store.exists(k) for k in thumbnails.keys)

    embedded = stub.EmbedText(
        extractor_pb2.EmbedTextRequest(clip=clip, dataset_key=final.dataset_key), timeout=120
    )
    names = store.get_arrays(embedded.key)["names"].tolist()
    assert embedded.count == len(names) and "red" in names and "circle" in names


def test_errors_carry_precise_codes(stub: extractor_pb2_grpc.ExtractorStub, tmp_path: Path) -> None:
    model = common_pb2.ModelSpec(source="torchvision", name="resnet18",
                                 weights_uri=str(tmp_path / "missing.pth"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.DescribeModel(common_pb2.DescribeModelRequest(model=model), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model.weights_uri" in caught.value.details()
    model = common_pb2.ModelSpec(source="torchvision", name="resnet1000")
    with pytest.raises(grpc.RpcError) as caught:
        stub.DescribeModel(common_pb2.DescribeModelRequest(model=model), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    request = extractor_pb2.ExtractRequest(
        model=common_pb2.ModelSpec(source="torchvision", name="resnet18"),
        layers=["layer4"],
        dataset=common_pb2.DatasetSpec(kind="broden", uri=str(tmp_path)),
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Extract(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "index.csv" in caught.value.details()
