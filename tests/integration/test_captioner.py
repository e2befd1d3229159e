"""The captioner as a real process (`neurodissect serve captioner`), called over gRPC.

The layer's activations and most thumbnails are in a local store; the rest come from
a stand-in extractor (an in-process gRPC server whose Materialize stores the PNGs),
so the captioner's extractor client runs for real, with deadline and bearer token.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from neurodissect.v1 import (
    captioner_pb2,
    captioner_pb2_grpc,
    common_pb2,
    extractor_pb2,
    extractor_pb2_grpc,
)

from services.captioner.backbones import build_encoder
from services.captioner.captioner import Captioner
from services.captioner.checkpoint import save_checkpoint
from services.captioner.vocabulary import Vocabulary
from services.common import keys
from services.common.client import wait_healthy
from services.common.result_store import export_key
from services.common.settings import Settings
from services.common.store import LocalStore
from tests.fixtures.ports import free_port
from tests.fixtures.processes import stop
from tests.unit.captioner.stored_layer import (
    ACTS_KEY,
    DATASET_KEY,
    LAYER,
    StoredLayer,
    colour_layer,
    png,
)
from tests.unit.captioner.synthetic import small_models

TOKEN = "s3cret"
METADATA = (("authorization", f"Bearer {TOKEN}"),)
MISSING = list(range(0, 30, 3))  # thumbnails left for Materialize
INPUT_SIZE = 224  # of the resnet18 captioner


@dataclass
class FakeExtractor(extractor_pb2_grpc.ExtractorServicer):
    store: LocalStore
    layer: StoredLayer
    calls: list[tuple[list[int], int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Materialize(  # noqa: N802
        self, request: extractor_pb2.MaterializeRequest, context: grpc.ServicerContext
    ) -> extractor_pb2.MaterializeResponse:
        token = dict(context.invocation_metadata()).get("authorization", "")
        with self.lock:
            self.calls.append((list(request.image_ids), request.size, str(token)))
        if token != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")
        out = []
        for i in request.image_ids:
            key = keys.thumbnail(request.dataset_key, i, request.size)
            self.store.put(key, png(self.layer.images[i]))
            out.append(key)
        return extractor_pb2.MaterializeResponse(keys=out)


@dataclass
class Service:
    channel: grpc.Channel
    stub: captioner_pb2_grpc.CaptionerStub
    store: LocalStore
    extractor: FakeExtractor
    checkpoint: Path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("captioner")
    store = LocalStore(root / "store")
    layer = colour_layer(store)
    for i in range(len(layer.images)):  # stored at the checkpoint's input size, but MISSING
        if i not in MISSING:
            store.put(keys.thumbnail(DATASET_KEY, i, INPUT_SIZE), png(layer.images[i]))
    torch.manual_seed(0)
    encoder = build_encoder("resnet18")
    decoder, lm = small_models(
        Vocabulary.build(["red things", "green things", "blue things"]), encoder.feature_dim
    )
    checkpoint = root / "captioner.pt"
    save_checkpoint(Captioner(encoder, decoder, lm), checkpoint)

    extractor = FakeExtractor(store, layer)
    extractor_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    extractor_pb2_grpc.add_ExtractorServicer_to_server(extractor, extractor_server)
    extractor_port = extractor_server.add_insecure_port("127.0.0.1:0")
    extractor_server.start()

    port = free_port()
    env = dict(os.environ)
    env.update(
        NEURODISSECT_PORT=str(port),
        NEURODISSECT_HOST="127.0.0.1",
        NEURODISSECT_STORE_URL=store.url,
        NEURODISSECT_METRICS_PORT="0",
        NEURODISSECT_EXTRACTOR_ADDR=f"127.0.0.1:{extractor_port}",
        NEURODISSECT_AUTH_TOKEN=TOKEN,
        NEURODISSECT_CACHE_DIR=str(root / "cache"),
        NEURODISSECT_LOG_LEVEL="INFO",
    )
    log = root / "captioner.log"
    command = Path(sys.executable).with_name("neurodissect")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(command), "serve", "captioner"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    address = f"127.0.0.1:{port}"
    try:
        wait_healthy(address, Settings(), timeout=120)
        with grpc.insecure_channel(address) as channel:
            stub = captioner_pb2_grpc.CaptionerStub(channel)
            yield Service(channel, stub, store, extractor, checkpoint)
    finally:
        stop(process)
        extractor_server.stop(0)
    assert process.returncode == 0, log.read_text()[-3000:]


def _request(checkpoint: Path | str, job: str, **params: object) -> captioner_pb2.CaptionRequest:
    fields: dict[str, object] = {
        "checkpoint_uri": str(checkpoint),
        "beam": 4,
        "max_tokens": 5,
        "exemplars": 4,
    }
    return captioner_pb2.CaptionRequest(
        job_id=job,
        layer=LAYER,
        acts_key=ACTS_KEY,
        dataset_key=DATASET_KEY,
        dataset=common_pb2.DatasetSpec(kind="toyworld"),
        params=common_pb2.MilanParams(**{**fields, **params}),
    )


def test_health_and_reflection(service: Service) -> None:
    health = health_pb2_grpc.HealthStub(service.channel)
    status = health.Check(
        health_pb2.HealthCheckRequest(service="neurodissect.v1.Captioner"), timeout=5
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    responses = reflection_pb2_grpc.ServerReflectionStub(service.channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
        timeout=5,
        metadata=METADATA,
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"neurodissect.v1.Captioner", "grpc.health.v1.Health"} <= names


def test_caption_materializes_thumbnails_and_stores_results(service: Service) -> None:
    request = _request(service.checkpoint, "grpc")
    progress = list(service.stub.Caption(request, timeout=300, metadata=METADATA))
    assert progress[-1].finished and progress[-1].units_done == progress[-1].units_total == 6

    rows = {}
    for u0, u1 in ((0, 4), (4, 6)):
        block = service.store.get_json(keys.result_block("grpc", LAYER, "milan", u0, u1))
        rows.update({row["unit"]: row for row in block["units"]})
    assert sorted(rows) == list(range(6))
    assert all(set(row) == {"unit", "caption", "logp_caption", "logp_lm"} for row in rows.values())
    csv_lines = service.store.get(export_key("grpc", LAYER, "milan")).decode().splitlines()
    assert csv_lines[0] == "layer,unit,description" and len(csv_lines) == 7

    asked = {i for ids, _, _ in service.extractor.calls for i in ids}
    assert asked and asked <= set(MISSING)  # only thumbnails that were not stored
    assert {size for _, size, _ in service.extractor.calls} == {INPUT_SIZE}
    assert {token for _, _, token in service.extractor.calls} == {f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("params", "code", "field"),
    [
        ({"beam": -1}, grpc.StatusCode.INVALID_ARGUMENT, "milan.beam"),
        ({"exemplars": 1000}, grpc.StatusCode.INVALID_ARGUMENT, "milan.exemplars"),
        (
            {"checkpoint_uri": "/nonexistent/c.pt"},
            grpc.StatusCode.NOT_FOUND,
            "milan.checkpoint_uri",
        ),
    ],
)
def test_bad_requests_get_precise_codes(
    service: Service, params: dict[str, object], code: grpc.StatusCode, field: str
) -> None:
    request = _request(service.checkpoint, "bad", **params)
    with pytest.raises(grpc.RpcError) as caught:
        list(service.stub.Caption(request, timeout=60, metadata=METADATA))
    assert caught.value.code() == code
    assert field in caught.value.details()


def test_calls_without_the_token_are_unauthenticated(service: Service) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(service.stub.Caption(_request(service.checkpoint, "anon"), timeout=30))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
