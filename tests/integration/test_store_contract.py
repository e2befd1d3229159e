"""One contract suite for every object store backend: local directory and real S3."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.common import keys
from services.common.errors import InvalidArgument, NotFound, StoreError
from services.common.settings import Settings
from services.common.store import LocalStore, ObjectStore, S3Store, open_store
from tests.fixtures.seaweedfs import S3Server, seaweedfs


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


_prefix_counter = iter(range(1_000_000))


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server: S3Server = request.getfixturevalue("s3_server")
    return S3Store(
        "contract",
        server.endpoint,
        server.access_key,
        server.secret_key,
        prefix=f"test-{next(_prefix_counter)}",
        part_size=5 << 20,
    )


def test_put_get_roundtrip(store: ObjectStore) -> None:
    store.put("a/b/c.bin", b"\x00\x01payload")
    assert store.get("a/b/c.bin") == b"\x00\x01payload"


def test_overwrite_replaces_whole_object(store: ObjectStore) -> None:
    store.put("k.bin", b"x" * 1000)
    store.put("k.bin", b"short")
    assert store.get("k.bin") == b"short"


def test_missing_key_is_not_found(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        store.get("no/such/object")
    assert not store.exists("no/such/object")


def test_exists_after_put_only(store: ObjectStore) -> None:
    assert not store.exists("x/y.json")
    store.put_json("x/y.json", {"a": 1})
    assert store.exists("x/y.json")
    assert not store.exists("x")


def test_list_by_prefix_sorted(store: ObjectStore) -> None:
    for name in ["r/j1/l/m/u8-16.json", "r/j1/l/m/u0-8.json", "r/j2/l/m/u0-8.json", "rx"]:
        store.put(name, b"{}")
    assert store.list("r/j1/") == ["r/j1/l/m/u0-8.json", "r/j1/l/m/u8-16.json"]
    assert store.list("r/") == sorted(["r/j1/l/m/u8-16.json", "r/j1/l/m/u0-8.json",
                                       "r/j2/l/m/u0-8.json"])
    assert store.list("nothing/") == []


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put("d.bin", b"1")
    store.delete("d.bin")
    store.delete("d.bin")
    assert not store.exists("d.bin")


def test_json_and_arrays(store: ObjectStore) -> None:
    store.put_json("j.json", {"units": [{"unit": 3, "label": "red"}]})
    assert store.get_json("j.json") == {"units": [{"unit": 3, "label": "red"}]}
    array = np.arange(24, dtype=np.float16).reshape(2, 3, 2, 2)
    store.put_array(keys.acts_chunk("k", "layer4", 0, 3, 0, 2), array)
    back = store.get_array(keys.acts_chunk("k", "layer4", 0, 3, 0, 2))
    assert back.dtype == np.float16 and np.array_equal(back, array)
    store.put_arrays("p.npz", {"mean": np.ones((2, 3)), "names": np.array(["a", "b"])})
    arrays = store.get_arrays("p.npz")
    assert arrays["mean"].shape == (2, 3) and list(arrays["names"]) == ["a", "b"]


def test_large_object_streams_in_parts(store: ObjectStore) -> None:
    blob = np.random.default_rng(0).bytes(12 << 20)  # > two 5 MiB multipart parts
    store.put("big.bin", blob)
    assert store.get("big.bin") == blob


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "a//b", "./a", "a\\b", "a/\x00"])
def test_hostile_keys_rejected(store: ObjectStore, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        store.put(bad, b"x")


def test_concurrent_writers_never_tear(store: ObjectStore) -> None:
    payloads = [bytes([i]) * 200_000 for i in range(4)]
    threads = [threading.Thread(target=store.put, args=("race.bin", p)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get("race.bin") in payloads


def test_local_store_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a/b.bin", b"1")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]


def test_open_store_from_settings(tmp_path: Path, s3_server: S3Server) -> None:
    local = Settings.load(env={"NEURODISSECT_STORE_URL": f"file://{tmp_path}/s"}).open_store()
    assert isinstance(local, LocalStore) and local.root == tmp_path / "s"
    env = {
        "NEURODISSECT_STORE_URL": "s3://contract/from-settings",
        "NEURODISSECT_S3_ENDPOINT": s3_server.endpoint,
        "NEURODISSECT_S3_ACCESS_KEY": s3_server.access_key,
        "NEURODISSECT_S3_SECRET_KEY": s3_server.secret_key,
    }
    remote = Settings.load(env=env).open_store()
    remote.put("x.json", b"{}")
    assert remote.list("") == ["x.json"]
    with pytest.raises(InvalidArgument):
        open_store("ftp://nope")


def test_s3_transient_errors_are_retried(s3_server: S3Server) -> None:
    store = S3Store("contract", s3_server.endpoint, s3_server.access_key,
                    s3_server.secret_key, prefix="retry")
    calls = {"n": 0}
    real_put = store.client.put_object

    def flaky_put(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("connection reset by peer")
        return real_put(*args, **kwargs)  # type: ignore[arg-type]

    store.client.put_object = flaky_put  # type: ignore[method-assign]
    store.put("flaky.bin", b"ok")
    assert calls["n"] == 3
    assert store.get("flaky.bin") == b"ok"


def test_s3_outage_within_the_retry_window_costs_a_pause(s3_server: S3Server) -> None:
    store = S3Store("contract", s3_server.endpoint, s3_server.access_key,
                    s3_server.secret_key, prefix="outage", retry_s=120)
    store.put("before.bin", b"1")
    finished: dict[str, float] = {}

    def write_during_outage() -> None:
        store.put("during.bin", b"2")
        finished["at"] = time.monotonic()

    with s3_server.outage():
        assert not store.probe() and store.outage_since is not None
        writer = threading.Thread(target=write_during_outage)
        writer.start()
        time.sleep(4)
        assert "at" not in finished  # waiting, not failing
        back = time.monotonic()
    writer.join(timeout=120)
    assert finished["at"] >= back
    assert store.get("during.bin") == b"2" and store.get("before.bin") == b"1"
    assert store.outage_since is None and store.probe()


def test_s3_calls_within_a_deadline_fail_fast_naming_the_store(s3_server: S3Server) -> None:
    store = S3Store("contract", s3_server.endpoint, s3_server.access_key,
                    s3_server.secret_key, prefix="deadline", retry_s=600)
    with s3_server.outage():
        started = time.monotonic()
        with pytest.raises(StoreError, match="s3://contract/deadline/ is unreachable"), \
                store.deadline(2.0):
            store.get("anything.bin")
        assert time.monotonic() - started < 15
