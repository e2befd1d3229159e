"""The local stack's ports and the environment of its Ray head (no process is started)."""

from __future__ import annotations

import pytest

from services.cli.stack import LocalStack, StackError, free_port, scrubbed_environment
from services.common.settings import SERVICES, Settings, usable_cores


def test_free_ports_are_never_handed_out_twice() -> None:
    stack = LocalStack(Settings(), free_ports=True)
    handed = [*stack.ports.values(), *stack.metrics_ports.values(), stack.settings.ui_port]
    assert len(handed) == len(set(handed)) == 2 * len(SERVICES) + 1
    assert {stack.address(n) for n in SERVICES} == {f"127.0.0.1:{stack.ports[n]}"
                                                    for n in SERVICES}


def test_free_port_skips_ports_already_taken() -> None:
    taken: set[int] = set()
    ports = [free_port(taken=taken) for _ in range(50)]
    assert len(set(ports)) == 50 and taken == set(ports)


def test_fixed_ports_come_from_the_service_addresses() -> None:
    port = free_port()
    stack = LocalStack(Settings(explainer_addr=f"127.0.0.1:{port}"), free_ports=False)
    assert stack.ports["explainer"] == port


def test_two_services_on_one_port_are_refused_before_anything_starts() -> None:
    with pytest.raises(StackError, match="would both listen on port 9555"):
        LocalStack(Settings(metrics_port=9555), free_ports=False)
    port = free_port()
    with pytest.raises(StackError, match=f"gateway and captioner would both listen on port {port}"):
        LocalStack(Settings(gateway_addr=f"127.0.0.1:{port}", captioner_addr=f"127.0.0.1:{port}"),
                   free_ports=False)


def test_extractor_replicas_get_their_ports_threads_and_the_gateway_their_addresses() -> None:
    stack = LocalStack(Settings(), free_ports=False, extractors=3)
    assert stack.services == ["gateway", "extractor", "extractor-1", "extractor-2", "explainer",
                              "captioner"]
    assert [stack.ports[f"extractor-{k}"] for k in (1, 2)] == [50055, 50056]
    assert [stack.metrics_ports[f"extractor-{k}"] for k in (1, 2)] == [9105, 9106]
    assert stack.settings.extractor_addresses() == [
        "127.0.0.1:50052", "127.0.0.1:50055", "127.0.0.1:50056"]
    assert stack.settings.torch_threads == max(1, usable_cores() // 3)
    pinned = LocalStack(Settings(torch_threads=5), free_ports=True, extractors=2)
    assert pinned.settings.torch_threads == 5
    assert len(set(pinned.ports.values())) == len(SERVICES) + 1
    single = LocalStack(Settings(), free_ports=True)
    assert single.settings.extractor_addrs == "" and single.settings.torch_threads == 0
    with pytest.raises(StackError, match="at least one extractor"):
        LocalStack(Settings(), extractors=0)


def test_the_ray_head_environment_holds_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEURODISSECT_AUTH_TOKEN", "t")
    monkeypatch.setenv("NEURODISSECT_S3_SECRET_KEY", "s")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("PATH", "/usr/bin")
    env = scrubbed_environment()
    assert not [k for k in env if k.startswith(("NEURODISSECT_", "AWS_", "RAY_ADDRESS"))]
    assert env["PATH"] == "/usr/bin"
