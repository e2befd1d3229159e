"""Sharded extraction: a toy job on two extractor processes stores exactly what one stores.

Each run is a real local stack (gateway, extractor replicas, explainer) on its own store.
Both fix one torch thread per extractor, so the same kernels run and the stored arrays
are equal bit for bit (same shapes, same batches, same kernels). In the sharded run the
second replica is down when the job starts: the gateway retries its shard call until the
replica is back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from neurodissect.v1 import common_pb2

from services.cli.main import demo_layers, demo_spec
from services.cli.stack import LocalStack
from services.common.settings import Settings
from services.common.store import LocalStore
from services.gateway.client import NeurodissectClient

REPO = Path(__file__).resolve().parents[2]
N_IMAGES, SIZE, CHUNK = 200, 32, 48  # five image ranges: shard 0 gets three, shard 1 two
RETRIED = "extractor 1 unavailable"  # the gateway's log line when it retries shard 1


def wait_for_line(path: Path, text: str, timeout: float = 300.0) -> None:
    """Wait until a log file holds `text`; fail naming it after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{path} never said {text!r}"
        time.sleep(0.2)


def dissect(root: Path, extractors: int) -> tuple[LocalStore, common_pb2.Job, dict[str, Any]]:
    """Run the toy NetDissect job on a fresh stack; its store, job and per-layer results."""
    settings = Settings(
        store_url=f"file://{root / 'store'}",
        cache_dir=str(REPO / "var" / "cache"),
        rpc_timeout_s=60.0,
        torch_threads=1,
    )
    stack = LocalStack(settings, services=["gateway", "extractor", "explainer"], ray_head=False,
                       log_dir=root / "logs", extractors=extractors)
    stack.start(timeout=900)
    try:
        with NeurodissectClient(stack.settings) as client:
            toynet = common_pb2.ModelSpec(source="toy", name="toynet")
            spec = demo_spec(demo_layers(client.describe_model(toynet)), ["netdissect"],
                             N_IMAGES, SIZE)
            spec.compute.image_chunk_size = CHUNK
            if extractors > 1:
                stack.kill("extractor-1")
            job_id = client.submit(spec).id
            if extractors > 1:
                wait_for_line(root / "logs" / "gateway.log", RETRIED)
                stack.start_service("extractor-1")
                stack.wait_healthy("extractor-1")
            job = client.wait(job_id)
            assert job.state == common_pb2.SUCCEEDED, job.error
            results = {layer: client.results(job.id, layer) for layer in job.spec.layers}
    finally:
        stack.stop()
    return LocalStore(root / "store"), job, results


def test_two_extractors_store_what_one_stores(tmp_path: Path) -> None:
    one_store, one, one_results = dissect(tmp_path / "one", 1)
    two_store, two, two_results = dissect(tmp_path / "two", 2)
    assert two.acts_keys == one.acts_keys and two.dataset_key == one.dataset_key
    extract = next(s for s in two.stages if s.stage == "extract")
    assert extract.done == extract.total == N_IMAGES
    # Both replicas forwarded their own image ranges.
    logs = {k: (tmp_path / "two" / "logs" / f"{k}.log").read_text()
            for k in ("extractor", "extractor-1")}
    assert "shard 0/2" in logs["extractor"] and "shard 1/2" in logs["extractor-1"]
    stored = one_store.list("acts/") + one_store.list("probe/")
    assert sorted(stored) == sorted(two_store.list("acts/") + two_store.list("probe/"))
    assert any(key.endswith("pooled.npz") for key in stored)
    for key in stored:
        assert two_store.get(key) == one_store.get(key), key
    assert two_results == one_results
    assert all("netdissect" in unit for units in one_results.values() for unit in units)
