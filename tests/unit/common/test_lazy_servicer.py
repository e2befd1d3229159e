"""lazy_servicer: the real servicer is built on the first call, shared, and dropped when idle."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from neurodissect.v1 import explainer_pb2, explainer_pb2_grpc

from services.common.lazy_servicer import lazy_servicer

SERVICE = explainer_pb2.DESCRIPTOR.services_by_name["Explainer"]


class Counting(explainer_pb2_grpc.ExplainerServicer):
    """Streams `units_done` 1, 2; for layer 'wait', waits on `gate` between the two."""

    built = 0

    def __init__(self, gate: threading.Event | None = None) -> None:
        type(self).built += 1
        self.gate = gate

    def Explain(  # noqa: N802
        self, request: explainer_pb2.ExplainRequest, context: Any
    ) -> Iterator[explainer_pb2.ExplainProgress]:
        yield explainer_pb2.ExplainProgress(units_done=1)
        if request.layer == "wait" and self.gate is not None:
            self.gate.wait(5)
        yield explainer_pb2.ExplainProgress(units_done=2)


def stand_in(release_after_s: float, gate: threading.Event | None = None) -> Any:
    Counting.built = 0
    return lazy_servicer(
        explainer_pb2_grpc.ExplainerServicer, SERVICE, lambda: Counting(gate), release_after_s
    )


def explain(servicer: Any) -> list[int]:
    return [m.units_done for m in servicer.Explain(explainer_pb2.ExplainRequest(), None)]


def test_built_on_the_first_call_only_and_reused() -> None:
    servicer = stand_in(release_after_s=60)
    assert Counting.built == 0
    assert explain(servicer) == [1, 2]
    assert explain(servicer) == [1, 2]
    assert Counting.built == 1


def test_dropped_after_idle_and_built_again_on_the_next_call() -> None:
    servicer = stand_in(release_after_s=0.05)
    explain(servicer)
    time.sleep(0.5)
    assert explain(servicer) == [1, 2]
    assert Counting.built == 2


def test_never_dropped_while_a_stream_is_in_flight() -> None:
    gate = threading.Event()
    servicer = stand_in(release_after_s=0.05, gate=gate)
    explain(servicer)  # idle from here: a release is due in 0.05 s
    stream = servicer.Explain(explainer_pb2.ExplainRequest(layer="wait"), None)
    assert next(stream).units_done == 1
    time.sleep(0.3)  # the release falls due while the stream is in flight
    gate.set()
    assert [m.units_done for m in stream] == [2]
    assert explain(servicer) == [1, 2]
    assert Counting.built == 1
