"""Stand-in extractor, explainer and captioner servers for gateway tests.

They speak the real protos over real gRPC on loopback ports and write what the real
services write (manifests, result blocks) into the same store, with answers that
are a pure function of (layer, method, unit), so the gateway's orchestration,
resume, cancel and merging can be tested in seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from neurodissect.v1 import (
    captioner_pb2,
    captioner_pb2_grpc,
    common_pb2,
    explainer_pb2,
    explainer_pb2_grpc,
    extractor_pb2,
    extractor_pb2_grpc,
)

from services.common import keys, result_store
from services.common.activations import ActivationManifest
from services.common.errors import InvalidArgument, NotFound
from services.common.server import ServiceServer
from services.common.settings import Settings
from services.common.store import LocalStore, ObjectStore
from services.explainer.methods import netdissect as netdissect_method
from services.explainer.methods import simulation as simulation_method
from services.gateway.client import NeurodissectClient
from services.gateway.server import GatewayServer, build
from tests.fixtures.ports import free_port

# The fake model: layer name -> units (maps are 4×4).
FAKE_LAYERS = {"conv1": 6, "conv2": 10, "fc": 4}
N_IMAGES = 12
BLOCK = 4


# The layer summaries of the methods that have figures, made by their shipped code.
SUMMARIES = {
    "netdissect": netdissect_method.layer_summary,
    "simulation": simulation_method.layer_summary,
}


def fake_row(layer: str, method: str, unit: int) -> dict[str, object]:
    """The answer the fake explainer/captioner stores for one unit."""
    label = f"{layer}-label{unit % 3}"
    score = round(0.01 * (unit + 1) + (0.1 if layer == "conv2" else 0.0), 4)
    if method == "netdissect":
        return {"unit": unit, "label": label, "category": "color" if unit % 2 else "object",
                "iou": score, "detector": unit % 2 == 0,
                "per_category": [{"category": "color", "label": label, "iou": score}],
                "threshold": 0.5, "exemplars": [unit % N_IMAGES, (unit + 1) % N_IMAGES]}
    if method == "compositional":
        return {"unit": unit, "formula": f"({label} OR sky) AND NOT red", "iou": score,
                "length": 3}
    if method == "clip_dissect":
        return {"unit": unit, "label": f"clip{unit}", "score": score,
                "top5": [{"concept": f"clip{unit}", "score": score}]}
    if method == "linear":
        return {"unit": unit, "explanation": f"0.50·{label} + 0.10", "bias": 0.1,
                "terms": [{"concept": label, "weight": 0.5}], "val_corr": score,
                "concepts": "label"}
    if method == "milan":
        return {"unit": unit, "caption": f"a {label} thing", "logp_caption": -3.0,
                "logp_lm": -5.0}
    if method == "simulation":
        dead = unit == 0 and layer == "fc"  # constant on the test images: no correlation
        rho = float("nan") if dead else score
        return result_store.simulation_row(unit, {"netdissect": rho, "linear": rho}, dead)
    raise AssertionError(method)


@dataclass
class Behaviour:
    """Knobs the tests turn: delays, a gate to hold work, failures; and a record of calls."""

    block_delay_s: float = 0.0
    gate: threading.Event = field(default_factory=lambda: _open_event())
    fail_explain: str = ""
    computed: list[tuple[str, str, int]] = field(default_factory=list)
    explain_calls: list[explainer_pb2.ExplainRequest] = field(default_factory=list)
    cancelled_calls: int = 0
    extract_calls: int = 0
    embedded: list[extractor_pb2.EmbedTextRequest] = field(default_factory=list)


def _open_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


def fake_spec(
    layers: tuple[str, ...] = ("conv1", "conv2"), **fields: object
) -> common_pb2.DissectionSpec:
    """A spec for the fake model with every method."""
    spec = common_pb2.DissectionSpec(
        model=common_pb2.ModelSpec(source="toy", name="fakenet"),
        layers=list(layers),
        dataset=common_pb2.DatasetSpec(kind="toyworld"),
        netdissect=common_pb2.NetDissectParams(),
        compositional=common_pb2.CompositionalParams(),
        clip_dissect=common_pb2.ClipDissectParams(clip=common_pb2.ClipModelSpec(arch="toy")),
        linear=common_pb2.LinearParams(),
        milan=common_pb2.MilanParams(checkpoint_uri="toy"),
        simulation=common_pb2.SimulationParams(simulator=common_pb2.ClipModelSpec(arch="toy")),
        **fields,  # type: ignore[arg-type]
    )
    return spec


class FakeExtractor(extractor_pb2_grpc.ExtractorServicer):
    def __init__(self, store: ObjectStore, behaviour: Behaviour) -> None:
        self.store = store
        self.behaviour = behaviour

    def DescribeModel(self, request, context):  # noqa: N802
        if request.model.source != "toy" or request.model.name != "fakenet":
            raise NotFound(f"unknown model {request.model.name!r}", field="model.name")
        return common_pb2.DescribeModelResponse(
            layers=[common_pb2.LayerInfo(name=n, shape=[u, 4, 4], module_type="Conv2d")
                    for n, u in FAKE_LAYERS.items()],
            input_size=32,
        )

    def Extract(self, request, context) -> Iterator[extractor_pb2.ExtractProgress]:  # noqa: N802
        self.behaviour.extract_calls += 1
        dataset_key = keys.content_key("dataset", request.dataset.SerializeToString())
        acts = {}
        for i in range(0, N_IMAGES, 4):
            yield extractor_pb2.ExtractProgress(images_done=i, images_total=N_IMAGES)
        for layer in request.layers:
            acts_key = keys.content_key("acts", dataset_key, layer)
            manifest = ActivationManifest(acts_key, layer, (N_IMAGES, FAKE_LAYERS[layer], 4, 4),
                                          "float16", BLOCK, 8, dataset_key)
            self.store.put_json(keys.manifest(acts_key, layer), manifest.to_json())
            acts[layer] = acts_key
        embeddings = {f"{c.arch}|{c.weights_uri}": f"embed/{dataset_key}/{c.arch}/images.npy"
                      for c in request.clip_models}
        yield extractor_pb2.ExtractProgress(
            images_done=N_IMAGES, images_total=N_IMAGES, finished=True, dataset_key=dataset_key,
            acts_keys=acts, image_embedding_keys=embeddings)

    def EmbedText(self, request, context):  # noqa: N802
        self.behaviour.embedded.append(request)
        return extractor_pb2.EmbedTextResponse(key=f"embed/text/{request.clip.arch}/t.npz",
                                               count=len(request.texts))

    def Materialize(self, request, context):  # noqa: N802
        stored = []
        for image_id in request.image_ids:
            key = keys.thumbnail(request.dataset_key, image_id, request.size)
            self.store.put(key, b"\x89PNG fake")
            stored.append(key)
        return extractor_pb2.MaterializeResponse(keys=stored)


def _blocks(n_units: int) -> list[tuple[int, int]]:
    return [(u0, min(u0 + BLOCK, n_units)) for u0 in range(0, n_units, BLOCK)]


class FakeExplainer(explainer_pb2_grpc.ExplainerServicer):
    def __init__(self, store: ObjectStore, behaviour: Behaviour) -> None:
        self.store = store
        self.behaviour = behaviour

    def Explain(self, request, context) -> Iterator[explainer_pb2.ExplainProgress]:  # noqa: N802
        behaviour = self.behaviour
        behaviour.explain_calls.append(request)
        if behaviour.fail_explain and request.layer == behaviour.fail_explain:
            raise InvalidArgument("the fake explainer refuses this layer", field="layer")
        n_units = FAKE_LAYERS[request.layer]
        for method in request.methods:
            done = 0
            for u0, u1 in _blocks(n_units):
                key = keys.result_block(request.job_id, request.layer, method, u0, u1)
                if not self.store.exists(key):
                    while not behaviour.gate.wait(0.05):
                        if not context.is_active():
                            behaviour.cancelled_calls += 1
                            return
                    time.sleep(behaviour.block_delay_s)
                    if not context.is_active():
                        behaviour.cancelled_calls += 1
                        return
                    rows = [fake_row(request.layer, method, u) for u in range(u0, u1)]
                    self.store.put_json(key, {"units": rows})
                    behaviour.computed.append((request.layer, method, u0))
                done = u1
                yield explainer_pb2.ExplainProgress(method=method, units_done=done,
                                                    units_total=n_units)
            # the layer summary as the method's own code makes it
            rows = result_store.read_rows(self.store, request.job_id, request.layer, method)
            summary = SUMMARIES.get(method, lambda rows: {"units": len(rows)})(rows)
            result_store.write_summary(self.store, request.job_id, request.layer, method, summary)
        yield explainer_pb2.ExplainProgress(finished=True)


class FakeCaptioner(captioner_pb2_grpc.CaptionerServicer):
    def __init__(self, store: ObjectStore, behaviour: Behaviour) -> None:
        self.store = store
        self.behaviour = behaviour

    def Caption(self, request, context) -> Iterator[captioner_pb2.CaptionProgress]:  # noqa: N802
        n_units = FAKE_LAYERS[request.layer]
        for u0, u1 in _blocks(n_units):
            key = keys.result_block(request.job_id, request.layer, "milan", u0, u1)
            if not self.store.exists(key):
                rows = [fake_row(request.layer, "milan", u) for u in range(u0, u1)]
                self.store.put_json(key, {"units": rows})
            yield captioner_pb2.CaptionProgress(units_done=u1, units_total=n_units)
        yield captioner_pb2.CaptionProgress(units_done=n_units, units_total=n_units,
                                            finished=True)


def start_fake(
    service: str, settings: Settings, store: ObjectStore, behaviour: Behaviour, port: int
) -> ServiceServer:
    """Start one fake peer on `port`."""
    servicer_classes = {
        "extractor": (FakeExtractor, extractor_pb2_grpc.add_ExtractorServicer_to_server,
                      extractor_pb2, "Extractor"),
        "explainer": (FakeExplainer, explainer_pb2_grpc.add_ExplainerServicer_to_server,
                      explainer_pb2, "Explainer"),
        "captioner": (FakeCaptioner, captioner_pb2_grpc.add_CaptionerServicer_to_server,
                      captioner_pb2, "Captioner"),
    }
    cls, add, module, name = servicer_classes[service]

    def register(server: grpc.Server) -> list[str]:
        add(cls(store, behaviour), server)
        return [module.DESCRIPTOR.services_by_name[name].full_name]

    return ServiceServer(service, settings.replace(port=port, metrics_port=0), register).start()


class FakeWorld:
    """A real gateway (in this process) wired to fake extractor, explainer and captioner."""

    def __init__(self, root: Path) -> None:
        self.store = LocalStore(root / "store")
        self.behaviour = Behaviour()
        ports = {name: free_port() for name in ("gateway", "extractor", "explainer", "captioner")}
        self.settings = Settings(
            store_url=self.store.url,
            metrics_port=0,
            rpc_timeout_s=10.0,
            **{f"{name}_addr": f"127.0.0.1:{port}" for name, port in ports.items()},
        )
        self.ports = ports
        self.peers: dict[str, ServiceServer] = {}
        self.gateway: GatewayServer | None = None

    def start_peer(self, name: str) -> None:
        self.peers[name] = start_fake(name, self.settings, self.store, self.behaviour,
                                      self.ports[name])

    def stop_peer(self, name: str) -> None:
        self.peers.pop(name).stop(grace=0.1)

    def start_gateway(self, **changes: object) -> GatewayServer:
        settings = self.settings.replace(port=self.ports["gateway"], **changes)
        self.gateway = build(settings).start()
        return self.gateway

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.stop(grace=0.1)
            self.gateway = None

    def client(self, **changes: object) -> NeurodissectClient:
        return NeurodissectClient(self.settings.replace(**changes))

    def close(self) -> None:
        self.stop_gateway()
        for name in list(self.peers):
            self.stop_peer(name)
