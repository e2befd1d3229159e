"""RayWatch: the explainer's health follows its Ray cluster, and a lost cluster is reported."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from services.common.settings import Settings
from services.explainer.ray_watch import RayWatch
from services.explainer.sharding import task_settings


@pytest.fixture()
def listener() -> Iterator[socket.socket]:
    """A TCP server standing in for a Ray GCS on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def watch_of(
    sock: socket.socket, connected: bool
) -> tuple[RayWatch, list[bool], list[str]]:
    statuses: list[bool] = []
    lost: list[str] = []
    endpoint = sock.getsockname()
    watch = RayWatch(lambda: endpoint, lambda: connected, statuses.append, lost.append)
    return watch, statuses, lost


def test_a_reachable_cluster_is_serving(listener: socket.socket) -> None:
    watch, statuses, lost = watch_of(listener, connected=True)
    assert watch.probe() and statuses == [True] and lost == []


def test_a_connected_cluster_that_refuses_connections_is_lost(listener: socket.socket) -> None:
    watch, statuses, lost = watch_of(listener, connected=True)
    host, port = listener.getsockname()
    listener.close()
    assert not watch.probe()
    assert statuses == [False]
    assert lost == [f"the Ray cluster at {host}:{port} refuses connections: its head is gone"]


def test_a_cluster_not_yet_connected_is_only_not_serving(listener: socket.socket) -> None:
    watch, statuses, lost = watch_of(listener, connected=False)
    listener.close()
    assert not watch.probe() and statuses == [False] and lost == []


def test_without_an_endpoint_a_local_ray_to_be_started_counts_as_serving() -> None:
    statuses: list[bool] = []
    watch = RayWatch(lambda: None, lambda: False, statuses.append, lambda reason: None)
    assert watch.probe() and statuses == [True]


def test_tasks_get_the_store_credentials_but_never_the_api_token() -> None:
    settings = Settings(auth_token="t", s3_access_key="a", s3_secret_key="s")
    handed = task_settings(settings)
    assert (handed.auth_token, handed.s3_access_key, handed.s3_secret_key) == ("", "a", "s")
